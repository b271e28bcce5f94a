"""Checks of what the user gave, made before DeepSpeed starts and before
anything is written, each failing with one line that names the problem and
what to do (``InputError``; the entry points exit with code 2)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
from typing import Callable

from cimfast.config.settings import ConfigError, InputError, RunConfig
from cimfast.engine import checkpoint
from cimfast.pipelines.atomic import write_text_atomically
from cimfast.pipelines.datasets import IMAGE_EXTENSIONS
from cimfast.pipelines.demo import DIGITS, PHOTOS

log = logging.getLogger("cimfast")


def check_run(run: RunConfig, job: str) -> None:
    """Data path, checkpoint to resume from, and the output folder. ``job``: the entry
    point's job name (``cim``, ``finetune``, ``dvae``): a checkpoint of another job is
    neither resumed nor removed by --overwrite (fine-tuning once wrote into the
    pre-training folder by default, and --overwrite deleted the model it fine-tuned)."""
    if run.data_path and run.data_path.startswith("demo:") and run.data_path not in (DIGITS, PHOTOS):
        raise InputError(f"data path {run.data_path}: the built-in data paths are {DIGITS} (the demo digits' train "
                         f"split) and {PHOTOS} (the demo photographs, as no data path)")
    if run.data_path and run.data_path not in (DIGITS, PHOTOS) and not os.path.exists(run.data_path):
        raise InputError(f"data path {run.data_path} does not exist: pass --data_path with an image folder "
                         "(one subfolder per class, or any tree of images) or a file list")
    if run.data_path and os.path.isdir(run.data_path) and not _has_an_image(run.data_path):
        raise InputError(f"data path {run.data_path} holds no images ({', '.join(IMAGE_EXTENSIONS)}): pass "
                         "--data_path with an image folder or a file list")
    if run.resume not in (None, "auto") and not os.path.isfile(os.path.join(run.resume, checkpoint.STATE_FILE)):
        raise InputError(f"--resume {run.resume} is not a finished cimfast checkpoint (no {checkpoint.STATE_FILE}): "
                         f"pass a folder under {checkpoint.checkpoint_root(run.output_dir)} or --resume auto")
    if run.resume not in (None, "auto"):
        checkpoint.require_job(run.resume, job, "--resume")
    latest = checkpoint.latest_checkpoint(run.output_dir)
    found = checkpoint.job_of(checkpoint.read_state(latest)) if latest else job
    if found != job:
        raise InputError(f"output folder {run.output_dir} holds the checkpoints of {checkpoint.JOB_NAMES[found]} "
                         f"(newest: {latest}), not of {checkpoint.JOB_NAMES[job]}: pass another --output_dir, or "
                         "move that run's checkpoints out of it")
    if run.resume == "auto":
        if latest:
            refuse_a_restart_into(latest)
            log.info("--resume auto: continuing from %s (step %d)", latest, checkpoint.read_state(latest)["step"])
        else:
            log.info("--resume auto: no checkpoint in %s: starting at step 0", run.output_dir)
    elif run.resume is None and latest and not run.overwrite:
        raise InputError(f"output folder {run.output_dir} holds checkpoints (the newest at step "
                         f"{checkpoint.read_state(latest)['step']}): continue it with --resume auto, start "
                         "over with --overwrite, or pass another --output_dir")


# what launchers and schedulers set in a process they restarted on their own
RESTART_COUNTERS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


class RestartRefused(Exception):
    """An automatic restart that would only meet the same stop again: exit code 3."""

    exit_code = 3


def refuse_a_restart_into(latest: str) -> None:
    """Automatic restarts (torchrun --max-restarts, a requeued SLURM job) retry what may pass
    (a lost rank, a stall), not a run stopped for non-finite losses: resumed unchanged, it
    would train to the same stop. Resumed by hand (no counter set), it goes on as asked, and
    the checkpoint is marked so that restarts of that attempt may retry from it."""
    state = checkpoint.read_state(latest)
    if state.get("reason") != "non-finite losses" or state.get("resumed_by_hand"):
        return
    counters = [f"{k}={os.environ[k]}" for k in RESTART_COUNTERS if int(os.environ.get(k) or 0) > 0]
    if not counters:  # the user changed the cause: later automatic restarts may retry from here
        if os.environ.get("RANK", "0") == "0":
            write_text_atomically(os.path.join(latest, checkpoint.STATE_FILE),
                                  json.dumps({**state, "resumed_by_hand": True}, indent=1), fsync=True)
        return
    raise RestartRefused(
        f"not retried: the newest checkpoint ({latest}, step {state['step']}) stopped the run for non-finite "
        f"losses, and this is an automatic restart ({', '.join(counters)}) that would meet them again. Change "
        "their cause (learning rate, data, bf16 instead of fp16), then resume by hand with --resume auto")


def nothing_left_message(job: str, step: int, max_steps: int) -> str:
    return (f"{job}: the checkpoint is at step {step} and --max_steps is {max_steps}: nothing left to train "
            "(raise --max_steps to train on)")


def nothing_left(run: RunConfig, job: str) -> bool:
    """Whether the checkpoint to resume already reached --max_steps: the run then stops
    before anything is set up or written (a finished run resumed by mistake)."""
    path = checkpoint.latest_checkpoint(run.output_dir) if run.resume == "auto" else run.resume
    if not path:
        return False
    step = checkpoint.read_state(path)["step"]
    if step < run.max_steps:
        return False
    log.info(nothing_left_message(job, step, run.max_steps))
    return True


def clear_previous_run(run: RunConfig, rank: int) -> None:
    """``--overwrite``: rank 0 removes the previous run's checkpoints, metrics and pictures.
    Called after every check passed and every rank joined (no rank still
    reads them), followed by a barrier."""
    if run.overwrite and run.resume is None and rank == 0 and checkpoint.latest_checkpoint(run.output_dir):
        log.warning("--overwrite: removing the checkpoints and metrics of the previous run in %s", run.output_dir)
        shutil.rmtree(checkpoint.checkpoint_root(run.output_dir), ignore_errors=True)
        shutil.rmtree(os.path.join(run.output_dir, "tensorboard"), ignore_errors=True)
        old_files = ["metrics.jsonl", "loss.png", "tokenizer.safetensors", "tokenizer_report.json",
                     "reconstructions.png"] + [f for f in os.listdir(run.output_dir)
                                               if f.startswith("picture_") and f.endswith(".png")]
        for name in old_files:
            if os.path.exists(os.path.join(run.output_dir, name)):
                os.remove(os.path.join(run.output_dir, name))


def _has_an_image(root: str) -> bool:
    """Whether any image file lies under ``root`` (stops at the first one)."""
    for _, _, files in os.walk(root, followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def check_port() -> None:
    """The rendezvous port, where this process will open it (rank 0 under the
    ``deepspeed`` launcher or plain python; torchrun's agent opens its own)."""
    if os.environ.get("RANK", "0") != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    try:
        local = addr in ("localhost", "127.0.0.1", "0.0.0.0", "::1") or socket.gethostbyname(addr) in (
            "127.0.0.1", socket.gethostbyname(socket.gethostname()))
    except OSError:
        local = False
    if not local:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} (MASTER_PORT) is in use, by another run perhaps: pass a free one "
                                 "with --master_port to the launcher") from None
            raise


def report(error: Exception, debug: bool) -> int:
    """An input error as one line on stderr: exit code 2 (``--debug``: the traceback too)."""
    if debug:
        import traceback

        traceback.print_exception(error)
    kind = "configuration error: " if isinstance(error, ConfigError) else ""
    print(f"cimfast: {kind}{error}", file=sys.stderr)
    return 2


def guarded(body: Callable[[], int], argv) -> int:
    """Run an entry point's body, turning an ``InputError`` into one line and exit code 2,
    a checkpoint that could not be written into one line and exit code 4, a refused
    automatic restart into one line and exit code 3."""
    debug = "--debug" in (sys.argv if argv is None else argv)
    try:
        return body()
    except InputError as e:
        return report(e, debug)
    except (checkpoint.CheckpointWriteError, RestartRefused) as e:  # one line on every rank, its own exit code
        print(f"cimfast: {e}", file=sys.stderr)
        return e.exit_code


EXIT_FILE = "CIMFAST_EXIT_FILE"


def record_exit(code: int) -> None:
    """Rank 0's exit code into the file $CIMFAST_EXIT_FILE names, when set: torchrun exits 1
    whatever its ranks' codes, and a batch script that decides whether to requeue needs
    cimfast's own (no file: rank 0 was killed)."""
    path = os.environ.get(EXIT_FILE)
    if path and os.environ.get("RANK", "0") == "0":
        try:
            write_text_atomically(path, f"{code}\n")
        except OSError as e:
            print(f"cimfast: could not write the exit code to {path} ({EXIT_FILE}): {e}", file=sys.stderr)


def run_and_exit(main: Callable[[], int]) -> None:
    """A script's exit: ``main()``'s code, then everything flushed and the
    process gone without the interpreter's teardown, which can hang on
    DataLoader workers or CUDA and NCCL state after the last line (holding a
    GPU the launcher waits for) or abort in native destructors.

    Exit codes are Python's: an exception prints its traceback and exits 1,
    ``SystemExit`` keeps its code (None: 0; a message: printed, 1), Ctrl-C
    before the run's own handlers exits 130."""
    import traceback

    code = 1
    try:
        code = main()
        code = 0 if code is None else int(code)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001  (reported like Python would, then the same exit)
        traceback.print_exc()
    finally:
        for flush in (sys.stdout.flush, sys.stderr.flush, logging.shutdown):
            try:
                flush()
            except Exception:  # noqa: BLE001  (a closed pipe must not keep the process alive)
                pass
        record_exit(code)
        os._exit(code)

