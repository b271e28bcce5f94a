"""What a run leaves and shows: rank 0's metric lines and progress bar, every
rank's checkpoints, pictures and evaluations."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cimfast.config.settings import RunConfig
from cimfast.engine import checkpoint
from cimfast.engine.metrics import MetricsWriter, closing_summary, progress_postfix, read_metrics
from cimfast.engine.pictures import save_loss_plot

if TYPE_CHECKING:  # the loop imports this module
    from cimfast.engine.loop import Job

log = logging.getLogger("cimfast")


def terminal_columns() -> int:
    """The width of the terminal rank 0 writes to; 0 when stderr is no terminal (a file,
    a pipe) or one that reports no width (tqdm draws nothing there)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError):
        return 0


def together() -> None:
    """The ranks leave a long phase (evaluation, checkpoint, picture) together: a rank done
    before rank 0 would wait for it in the next step's collectives, under the short
    training timeout."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Outputs:
    """Rank 0's metric lines and progress bar; every rank's checkpoints and pictures."""

    def __init__(self, job: Job, run: RunConfig, engine, rank: int, step: int):
        self.job, self.run, self.engine, self.rank = job, run, engine, rank
        self.writer = MetricsWriter(run.output_dir, step) if rank == 0 else None
        self.bar = None
        self.saved_at = time.monotonic()  # --checkpoint_minutes count from the start of the run
        self._redirect = None
        if rank == 0 and run.progress and terminal_columns() > 0:
            # A bar is for a terminal; into a file (a cluster's log) its redraws are one long
            # line, so there each metric record is a log line instead.
            self.bar = tqdm(total=run.max_steps, initial=step, desc=job.name, dynamic_ncols=True)
            # log records (and Python warnings, through logging) print above the bar, not glued to it
            consoles = [lg for lg in (logging.getLogger(), logging.getLogger("DeepSpeed"))
                        if any(type(h) is logging.StreamHandler for h in lg.handlers)]
            self._redirect = logging_redirect_tqdm(loggers=consoles)
            self._redirect.__enter__()
            logging.captureWarnings(True)

    def show(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        self.writer.write(step, metrics)
        if self.bar is not None:
            self.bar.set_postfix(progress_postfix(metrics))
        else:
            # 6 significant digits: a small learning rate (1e-8) must not read as 0
            log.info("step %d: %s", step, json.dumps({k: float(f"{v:.6g}") for k, v in metrics.items()}))

    def save(self, state: dict, step: int, reason: str) -> None:
        state.update(step=step, config=self.job.config, reason=reason, job=self.job.name)
        if self.job.state is not None:
            state["job_state"] = self.job.state()
        self.saved_at = time.monotonic()  # the clock restarts at every checkpoint, written or not
        try:
            path = checkpoint.save(self.engine, self.run.output_dir, step, state, self.run.keep_checkpoints, self.rank)
        except checkpoint.CheckpointWriteError as e:
            if self.run.checkpoint_errors != "warn" or reason not in ("interval", "clock"):  # nothing later saves it
                raise
            log.warning("%s; training goes on (--checkpoint_errors warn)", e)
            together()
            return
        if self.rank == 0:
            log.info("checkpoint (%s): %s", reason, path)
        together()  # rank 0 may still be removing old checkpoints

    @contextmanager
    def _eval_mode(self):
        """The module in eval mode without gradients, its mode restored after."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield module
        finally:
            module.train(was_training)

    def picture(self, name: str) -> None:
        if self.job.picture is None:
            return
        with self._eval_mode() as module:
            self.job.picture(module, os.path.join(self.run.output_dir, name) if self.rank == 0 else None)
        together()

    def evaluate(self, step: int) -> float:
        """The job's evaluation (k-NN monitor, validation top-1), on all ranks; its time is logged."""
        if self.job.evaluate is None:
            return 0.0
        t0 = time.perf_counter()
        with self._eval_mode() as module:
            metrics = self.job.evaluate(module, step)
        metrics["eval_seconds"] = time.perf_counter() - t0
        if self.rank == 0:
            self.writer.write(step, metrics)
            log.info("step %d evaluation: %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        together()
        return metrics["eval_seconds"]

    def periodic(self, state: dict, step: int) -> float:
        """Checkpoint, evaluation and picture when due; returns the evaluation's
        seconds (left out of the next throughput record)."""
        run = self.run
        spent = 0.0
        every = self.job.eval_interval
        if every and step % every == 0 and step < run.max_steps:  # the last one follows the end checkpoint
            spent = self.evaluate(step)
        if run.checkpoint_interval and step % run.checkpoint_interval == 0 and step < run.max_steps:
            self.save(state, step, "interval")
        if run.image_interval and step % run.image_interval == 0:
            self.picture(f"picture_step{step:08d}.png")
        return spent

    def clock_due(self) -> bool:
        """This rank's clock: --checkpoint_minutes have passed since the last checkpoint (or the start)."""
        minutes = self.run.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.saved_at >= 60 * minutes

    def advance(self) -> None:
        """One step done: the progress bar moves."""
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, state: dict, step: int, code: int, stopped: bool) -> None:
        """The last checkpoint, named for why the loop ended; at the end of the run
        also the final evaluation and picture."""
        if code:
            self.save(state, step, "non-finite losses")
        elif stopped and step < self.run.max_steps:
            self.save(state, step, "signal")
            log.info("stopped by signal at step %d; continue with --resume auto", step)
        else:
            self.save(state, step, "end")
            self.evaluate(step)
            self.picture("picture_final.png")

    def abandon(self) -> None:
        """The progress bar closed, metrics and TensorBoard flushed (all a run that raised gets)."""
        if self.bar is not None:
            bar, self.bar = self.bar, None
            try:
                bar.close()
            finally:  # the console handlers back, even if the terminal went away
                self._redirect.__exit__(None, None, None)
                logging.captureWarnings(False)
        if self.writer is not None:
            self.writer.close()

    def close(self, step: int) -> None:
        self.abandon()
        if self.rank == 0:
            records = read_metrics(self.run.output_dir)
            if records:
                save_loss_plot(records, os.path.join(self.run.output_dir, "loss.png"))
            summary = closing_summary(records)
            log.info("done: step %d, %soutputs in %s", step, f"{summary}; " if summary else "", self.run.output_dir)
