"""The training loop shared by CIM pre-training and tokenizer training:
distributed start, the DeepSpeed engine, resume, the step loop, metrics,
checkpoints and pictures.

Between log intervals the loop never reads the device: the non-finite skip
and the stop request are decided without a host sync (``cimfast.guards``),
metrics accumulate on the device (``cimfast.metrics.Meter``), and the next
batch's copy runs while the step computes
(``cimfast.pipelines.prefetch``)."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cimfast import checkpoint
from cimfast.config import InputError, RunConfig
from cimfast.guards import NonFiniteGuard, StopRequest, remove_clip_sync
from cimfast.metrics import Meter, MetricsWriter, peak_flops, progress_postfix, read_metrics
from cimfast.pictures import save_loss_plot
from cimfast.pipelines.prefetch import DevicePrefetcher
from cimfast.preflight import check_port, clear_previous_run, nothing_left_message

log = logging.getLogger("cimfast")


# DeepSpeed warnings that every correct run printed: WarmupCosineLR's constructor reads
# its own learning rate before its first step
DEEPSPEED_NOISE = ("Attempting to get learning rate from scheduler before it has started",)


def _not_noise(record: logging.LogRecord) -> bool:
    return record.getMessage() not in DEEPSPEED_NOISE


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s cimfast %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    ds_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates, same object before or after
    if _not_noise not in ds_logger.filters:
        ds_logger.addFilter(_not_noise)


def fill_rendezvous_env() -> None:
    """Single-process defaults when no launcher set the rendezvous variables."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def fill_auto(ds: dict, run: RunConfig) -> dict:
    """``"auto"`` in the scheduler's step counts (derived from --max_steps), and
    two DeepSpeed defaults that read the device at every step, turned off
    unless the config sets them: the throughput timer (it synchronizes the
    device at every forward and step) and bf16's gradient-overflow check (a
    host read of the gradient norm; cimfast's own guard skips non-finite
    steps, see ``cimfast.guards``)."""
    params = ds.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = run.max_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, run.max_steps // 10)
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    opt = ds.get("optimizer", {}).get("params", {})
    if ds.get("bf16", {}).get("enabled") and opt.get("torch_adam") and opt.get("fused"):
        ds["bf16"].setdefault("check_grad_overflow", False)  # the guard skips on the device instead
    return ds


def extensions_dir() -> str:
    """Where DeepSpeed's just-in-time C++ ops are built: one folder per Python environment.
    torch's default is one folder for all of them, and a build made from another
    environment's sources is rebuilt: two checkouts rebuilt each other's CPU all-reduce
    op at every run (20-30 s of silence at start). TORCH_EXTENSIONS_DIR overrides it."""
    import hashlib

    env = hashlib.sha1(f"{os.path.realpath(sys.prefix)} {torch.__version__}".encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "cimfast", "torch_extensions", env)


def init_distributed() -> tuple[int, int, torch.device]:
    fill_rendezvous_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    check_port()
    try:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    except Exception as e:  # the store's port taken between the check and now, or by another host
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise InputError(f"port {os.environ.get('MASTER_PORT')} (MASTER_PORT) is in use: pass a free one "
                             "with --master_port to the launcher") from None
        raise
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # DS_ACCELERATOR=cpu, with or without a GPU
        unlink_shm_allreduce_name()
    return dist.get_rank(), dist.get_world_size(), device


SHM_DIR = "/dev/shm"


def unlink_shm_allreduce_name() -> None:
    """DeepSpeed's CPU all-reduce (used when its launcher starts every rank on one
    host) maps one 69 MB file per rank in /dev/shm, named by user, master address,
    port and rank, and never unlinks it: each CPU run on a new port would leave
    69 MB of memory per rank behind until reboot (a test machine filled 20 GB so).
    Each rank maps every peer's file while deepspeed.init_distributed runs; past a
    barrier no rank opens one again, so each rank unlinks its own name at once
    and the mappings live on to the end of the run, however it ends then (a rank
    that dies inside init_distributed, before the barrier, still leaves them)."""
    rank = dist.get_rank()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:  # no shm all-reduce: another launcher (torchrun), or ranks on several hosts
        pass


def resolve_cuda_defaults(run: RunConfig, device: torch.device) -> RunConfig:
    """Settings left unset (None) that are on with CUDA and off elsewhere:
    compile, the tokenizer's bf16 fast path, pinned loader memory. The one
    place that decides them, so a CPU test can force every CUDA default on."""
    for key in ("compile", "tokenizer_bf16", "pin_memory"):
        if getattr(run, key) is None:
            setattr(run, key, device.type == "cuda")
    return run


def write_config(run: RunConfig, rank: int, settings: dict) -> None:
    """``config.json``: every setting of the run (rank 0), after ``--overwrite`` cleared the old run."""
    clear_previous_run(run, rank)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        os.makedirs(run.output_dir, exist_ok=True)
        with open(os.path.join(run.output_dir, "config.json"), "w") as f:
            json.dump(settings, f, indent=1)


def param_groups(model: torch.nn.Module) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and learned tokens (BEiT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_resume(run: RunConfig) -> Optional[str]:
    """The checkpoint to continue from (``check_run`` has vetted the setting)."""
    if run.resume == "auto":
        return checkpoint.latest_checkpoint(run.output_dir)
    return run.resume or None


@dataclass
class Job:
    """What the training loop needs to know about the model it trains."""

    name: str
    model: torch.nn.Module  # on the training device
    batches: Callable[[int, int], Iterator[dict]]  # (micro-batch, first global micro-step) -> this rank's batches
    forward: Callable  # (engine, batch on the device, step) -> dict of scalar tensors with "loss"
    config: dict  # saved into every checkpoint
    flops_per_image: float = 0.0  # for MFU; 0: not reported
    picture: Optional[Callable] = None  # (module, path) -> None, called on all ranks
    summary: str = ""
    on_log: Optional[Callable] = None  # (step, metrics, engine) -> more metrics, at each log interval on all ranks
    evaluate: Optional[Callable] = None  # (module, step) -> metrics, on all ranks, in eval mode
    eval_interval: int = 0  # steps between evaluations (and one at the end); 0: only at the end
    param_groups: Optional[list] = None  # the optimizer's groups (default: no decay on biases and norms)


def make_engine(model: torch.nn.Module, ds_cfg: dict, run: RunConfig, groups: Optional[list] = None):
    import deepspeed

    groups = groups or param_groups(model)
    client_optimizer = None  # () -> an optimizer cimfast builds itself and hands to DeepSpeed
    if ds_cfg.get("optimizer", {}).get("type") == "timm.Lamb":  # DeepSpeed's own Lamb is a CUDA-only extension
        from timm.optim import Lamb

        if ds_cfg.get("zero_optimization", {}).get("stage", 0):
            raise InputError("optimizer timm.Lamb needs zero_optimization stage 0: its trust ratio is per tensor, "
                             "and ZeRO's optimizer would hand it flat shards that mix tensors")
        params = dict(ds_cfg["optimizer"].get("params", {}))
        params["betas"] = tuple(params.get("betas", (0.9, 0.999)))
        ds_cfg = {k: v for k, v in ds_cfg.items() if k != "optimizer"}
        client_optimizer = lambda: Lamb(groups, **params)  # noqa: E731
    try:
        optimizer = client_optimizer() if client_optimizer else None
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if optimizer else groups,
                                               optimizer=optimizer, config=ds_cfg)
    except TypeError as e:  # an optimizer or scheduler parameter its class does not take
        if "unexpected keyword argument" not in str(e):
            raise
        raise InputError(f"ds_config: {e} (check the \"params\" of \"optimizer\" and \"scheduler\")") from e
    remove_clip_sync(engine.optimizer)
    if run.compile:
        # static shapes: the training step's shapes never change, and inductor's dynamic-batch recompile
        # of the ResPix target's float64 cumsum crashed on an H200 (torch 2.11) when another shape came
        # by. A new shape (fine-tuning's smaller last validation batch) costs one static compile of its own.
        engine.compile(compile_kwargs={"dynamic": False})
    return engine


def train_step(engine, job: Job, batches, guard: NonFiniteGuard, meter: Meter, state: dict, step: int) -> None:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches,
    without a host read (unless the guard checks non-finite losses on the host)."""
    done = 0
    while done < engine.gradient_accumulation_steps():
        out = job.forward(engine, next(batches), step)
        state["micro_steps_consumed"] += 1
        if guard.skip(out["loss"]):
            if guard.exhausted:
                return
            continue
        engine.backward(out["loss"])
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            guard.before_update()
        engine.step()
        if boundary:
            guard.after_update()
        meter.add(out)
        done += 1


def terminal_columns() -> int:
    """The width of the terminal rank 0 writes to; 0 when stderr is no terminal (a file,
    a pipe) or one that reports no width (tqdm draws nothing there)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError):
        return 0


class Outputs:
    """Rank 0's metric lines and progress bar; every rank's checkpoints and pictures."""

    def __init__(self, job: Job, run: RunConfig, engine, rank: int, step: int):
        self.job, self.run, self.engine, self.rank = job, run, engine, rank
        self.writer = MetricsWriter(run.output_dir, step) if rank == 0 else None
        self.bar = None
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
        path = checkpoint.save(self.engine, self.run.output_dir, step, state, self.run.keep_checkpoints, self.rank)
        if self.rank == 0:
            log.info("checkpoint (%s): %s", reason, path)

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
            log.info("done: step %d, outputs in %s", step, self.run.output_dir)


def log_extras(engine, device: torch.device) -> dict:
    """What the engine and the device report at a log interval."""
    extras = {"lr": engine.get_lr()[0]}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        extras["grad_norm"] = float(norm)
    if device.type == "cuda":
        extras["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return extras


def nonfinite_stop(in_a_row: int) -> int:
    log.error("%d non-finite losses in a row: stopping. Lower the learning rate, check the data, "
              "or use bf16 instead of fp16; resume with --resume auto.", in_a_row)
    return 3


def run_job(job: Job, run: RunConfig, ds_cfg: dict, rank: int, world: int, device: torch.device) -> int:
    resume_path = resolve_resume(run)
    engine = make_engine(job.model, ds_cfg, run, job.param_groups)
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    state = {"step": 0, "micro_steps_consumed": 0, "nonfinite_total": 0}
    if resume_path:
        state.update(checkpoint.load(engine, resume_path))
        log.info("resumed from %s at step %d", resume_path, state["step"])
        planned = state.get("config", {}).get("max_steps")
        if planned is not None and planned != run.max_steps and state["step"] < run.max_steps:
            log.warning("the run was planned for %d steps and now runs to %d: from step %d on, what is "
                        "derived from the run's length is redrawn for %d steps (\"auto\" warmup and cosine "
                        "of the learning rate, the tokenizer's temperature and KL ramps)",
                        planned, run.max_steps, state["step"], run.max_steps)
    step = state["step"]
    if step >= run.max_steps:  # a finished run resumed (fine-tuning: its length comes from its epochs)
        log.info(nothing_left_message(job.name, step, run.max_steps))
        return 0
    batches = DevicePrefetcher(job.batches(micro, state["micro_steps_consumed"]), device)
    guard = NonFiniteGuard(engine.optimizer, device, world, state["nonfinite_total"], run.max_nonfinite)
    peak = peak_flops(device, run.peak_tflops) if job.flops_per_image else None  # no FLOP count: no MFU
    meter = Meter(world, micro * gas * world, job.flops_per_image, peak, step)
    stopper = StopRequest(world)
    outputs = Outputs(job, run, engine, rank, step)
    log.info("%s: %d rank(s), micro-batch %d x %d accumulation = global batch %d; %s",
             job.name, world, micro, gas, micro * gas * world, job.summary)

    code, stopped = 0, False
    try:
        engine.train()
        while step < run.max_steps and not stopped:
            train_step(engine, job, batches, guard, meter, state, step)
            if guard.exhausted:  # host path: the micro-batches kept failing
                code = nonfinite_stop(run.max_nonfinite)
                break
            step += 1
            if outputs.bar is not None:
                outputs.bar.update(1)
            if step % run.log_interval == 0 or step == run.max_steps:  # the one host read
                meter.waited(batches.take_wait())
                metrics = meter.report(step, guard.counters())
                metrics.update(log_extras(engine, device))
                if job.on_log is not None:
                    metrics.update(job.on_log(step, metrics, engine))
                _, in_a_row = guard.read(metrics)
                outputs.show(step, metrics)
                if in_a_row >= run.max_nonfinite:
                    code = nonfinite_stop(in_a_row)
                    break
            meter.since += outputs.periodic(state, step)
            stopped = stopper.agreed()

        state["nonfinite_total"] = guard.total_now()
        if code:
            outputs.save(state, step, "non-finite losses")
        elif stopped and step < run.max_steps:
            outputs.save(state, step, "signal")
            log.info("stopped by signal at step %d; continue with --resume auto", step)
        else:
            outputs.save(state, step, "end")
            outputs.evaluate(step)
            outputs.picture("picture_final.png")
    except BaseException:
        outputs.abandon()  # what was logged reaches the disk before the error propagates
        raise
    outputs.close(step)
    return code


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
