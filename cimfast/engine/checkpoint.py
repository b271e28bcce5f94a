"""Atomic checkpoints of a DeepSpeed run.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/          one finished checkpoint (DeepSpeed's files +
        cimfast_state.json  cimfast's own state: step, counters, config)
    latest                  name of the newest finished checkpoint

A checkpoint is written into ``.tmp-step_N`` and renamed into place only when
every rank has finished writing; ``latest`` is replaced atomically after
that. A kill at any moment leaves the previous checkpoint and ``latest``
intact; leftover ``.tmp-*`` folders are removed at the next save.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch
import torch.distributed as dist

from cimfast.config.settings import InputError
from cimfast.pipelines.atomic import write_text_atomically

STATE_FILE = "cimfast_state.json"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a file too large, an I/O
    error), on any rank; the previous checkpoint stays the newest complete one."""

    exit_code = 4


def _failed_ranks(error: Exception | None) -> list[int]:
    """The ranks whose part of the save failed, known to every rank: one all-reduce,
    where a barrier stood (a rank that raised alone would leave the others waiting)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if error is not None else []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = float(error is not None)
    dist.all_reduce(flags)
    return [int(r) for r in torch.nonzero(flags).flatten().tolist()]


# The barriers DeepSpeed's save_checkpoint runs on every rank (0.19.8, ZeRO 0-2 without MoE: one
# before the files are written, one after). A rank whose write failed runs the ones it skipped.
SAVE_BARRIERS = 2


def _save_engine(engine, tmp_root: str, tag: str) -> Exception | None:
    """``engine.save_checkpoint``, its write error (each rank writes its own shards)
    returned instead of raised once this rank has taken part in every barrier the
    others run, so that none is left waiting. ZeRO-3 gathers weights while saving:
    there a failure is raised as it comes."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    passed, real_barrier = [0], dist.barrier

    def counted(*args, **kwargs):
        passed[0] += 1
        return real_barrier(*args, **kwargs)

    dist.barrier = counted
    try:
        engine.save_checkpoint(tmp_root, tag=tag, save_latest=False)
        return None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if stage >= 3 or getattr(engine, "has_moe_layers", False):
            raise
        error = e
    finally:
        dist.barrier = real_barrier
    if dist.is_available() and dist.is_initialized():
        for _ in range(SAVE_BARRIERS - passed[0]):
            dist.barrier()
    return error


def _check_written(error: Exception | None, rank: int, path: str, tmp_root: str) -> None:
    """Raise ``CheckpointWriteError`` on every rank when any rank failed, after rank 0
    removed the partial checkpoint."""
    failed = _failed_ranks(error)
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
    cause = f"{error.strerror or error}" if isinstance(error, OSError) else str(error)
    where = f"rank {rank}: {cause} ({getattr(error, 'filename', None) or path})" if error is not None else \
        f"rank(s) {', '.join(map(str, failed))} (their log names the cause)"
    raise CheckpointWriteError(f"checkpoint {path} could not be written: {where}; the newest complete checkpoint "
                               f"is still {latest_checkpoint(os.path.dirname(os.path.dirname(path)))}")


def finished_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if d.startswith("step_") and os.path.isfile(os.path.join(root, d, STATE_FILE)))


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest finished checkpoint, or None."""
    root = checkpoint_root(output_dir)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        if os.path.isfile(os.path.join(root, tag, STATE_FILE)):
            return os.path.join(root, tag)
    done = finished_checkpoints(root)  # the pointer is missing or stale: fall back to the newest
    return os.path.join(root, done[-1]) if done else None


def save(engine, output_dir: str, step: int, state: dict, keep: int, rank: int) -> str:
    """Write a checkpoint of ``engine`` with cimfast's ``state``; returns its path. Call on all ranks."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    tmp_root = os.path.join(root, f".tmp-{tag}")
    final = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):  # what an interrupted save left: folders and temporary files
            if d.startswith(".tmp-"):
                stale = os.path.join(root, d)
                shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.unlink(stale)
    _barrier()
    error = _save_engine(engine, tmp_root, tag)
    _check_written(error, rank, final, tmp_root)
    if rank == 0:
        try:
            write_text_atomically(os.path.join(tmp_root, tag, STATE_FILE), json.dumps(state, indent=1), fsync=True)
            if os.path.isdir(final):  # the same step saved twice (e.g. end of run after an interval save)
                shutil.rmtree(final)
            os.replace(os.path.join(tmp_root, tag), final)  # from here on the checkpoint is complete
            _fsync_dir(root)
            write_text_atomically(os.path.join(root, "latest"), tag, fsync=True)
        except OSError as e:
            error = e
    _check_written(error, rank, final, tmp_root)
    if rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        for old in finished_checkpoints(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


JOB_NAMES = {"cim": "pre-training (cimfast/train.py)", "finetune": "fine-tuning (cimfast/finetune.py)",
             "dvae": "tokenizer training (cimfast/tokenizer_train.py)"}


def job_of(state: dict) -> str:
    """Which entry point wrote a checkpoint: its ``job`` (older checkpoints: told by their settings)."""
    if "job" in state:
        return state["job"]
    cfg = state.get("config", {})
    return "finetune" if "recipe" in cfg else "dvae" if "spec" in cfg else "cim"


def require_job(path: str, job: str, what: str) -> dict:
    """The state of checkpoint ``path``; an InputError when another entry point wrote it."""
    state = read_state(path)
    found = job_of(state)
    if found != job:
        raise InputError(f"{what} {path} is a checkpoint of {JOB_NAMES.get(found, found)}, not of "
                         f"{JOB_NAMES.get(job, job)}")
    return state


def _deepspeed_state_types() -> list:
    """The non-tensor types DeepSpeed's checkpoint files hold (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_files(path: str) -> None:
    """Read every file of a checkpoint folder with ``weights_only=True`` (tensors,
    containers and the few DeepSpeed types above; memory-mapped, so no tensor
    data is read) before anything loads it for real. DeepSpeed's own loaders
    and ``zero_to_fp32`` unpickle without restriction: a checkpoint received
    from someone else could otherwise run code on ``--resume`` or export."""
    allowed = _deepspeed_state_types()
    for f in sorted(glob.glob(os.path.join(path, "*.pt"))):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"checkpoint file {f} was refused: it holds more than tensors and the DeepSpeed "
                             f"state types cimfast knows ({why[:200]}); load it only if you trust its source "
                             "and know what it holds") from None


def load(engine, path: str) -> dict:
    """Load ``engine`` (module, optimizer, scheduler) from a checkpoint folder; returns cimfast's state."""
    path = os.path.normpath(path)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise InputError(f"{path} is not a finished cimfast checkpoint (no {STATE_FILE})")
    verify_files(path)
    try:
        load_path, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001  (DeepSpeed's own type for it moved between versions)
        if "world size" not in str(e):
            raise
        raise InputError(f"{path} was saved by another number of ranks, and ZeRO cannot re-partition its "
                         f"optimizer state ({e}): resume on that number of ranks") from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return read_state(path)


def full_state_dict(ckpt: str) -> dict:
    """The fp32 state dict of the whole CIM module from a DeepSpeed checkpoint folder."""
    files = sorted(glob.glob(os.path.join(ckpt, "*mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*mp_rank_00_model_states.pt)")
    verify_files(ckpt)  # before zero_to_fp32's unrestricted load
    with torch.serialization.safe_globals(_deepspeed_state_types()):
        states = torch.load(files[0], map_location="cpu", weights_only=True)
    if states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt), tag=os.path.basename(ckpt))
    return {k: v.float() for k, v in states["module"].items()}
