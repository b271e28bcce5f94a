"""Where this process stands in the job: logging, the rendezvous, DeepSpeed's
distributed start on NCCL or gloo, the CUDA-only defaults, the end."""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from cimfast.config.preflight import check_port
from cimfast.config.settings import InputError, RunConfig
from cimfast.pipelines.demo import default_cache_dir

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


def engine_dtype(ds: dict) -> torch.dtype:
    """The dtype a DeepSpeed config trains in: bf16, fp16, else fp32."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def fill_auto(ds: dict, run: RunConfig) -> dict:
    """``"auto"`` in the scheduler's step counts (derived from --max_steps), and
    two DeepSpeed defaults that read the device at every step, turned off
    unless the config sets them: the throughput timer (it synchronizes the
    device at every forward and step) and bf16's gradient-overflow check (a
    host read of the gradient norm; cimfast's own guard skips non-finite
    steps, see ``cimfast.engine.guards``)."""
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
    """Where DeepSpeed's just-in-time C++ ops are built: one folder per Python environment,
    torch version and ``ninja`` binary, in cimfast's cache. torch's default is one folder for
    all, where an op built from another environment's sources is rebuilt at every start
    (20-30 s); and two ninjas (the environment's own once it is activated, the system's for
    a plain ``.venv/bin/deepspeed``) rewrite each other's build log, rebuilding the op at
    every switch. TORCH_EXTENSIONS_DIR overrides it."""
    import hashlib
    import shutil

    key = f"{os.path.realpath(sys.prefix)} {torch.__version__} {shutil.which('ninja')}"
    return os.path.join(default_cache_dir(), "torch_extensions", hashlib.sha1(key.encode()).hexdigest()[:12])


@dataclass(frozen=True)
class Place:
    """This process's place in the job: its rank, the number of ranks, its device."""

    rank: int
    world: int
    device: torch.device


def start_attempt_group(backend: str, timeout: Optional[timedelta]) -> None:
    """torchrun hands every restart attempt the same agent store (its static rendezvous, and
    c10d's unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), where the failed attempt's ranks left
    their addresses under the same keys: a restarted rank could read a dead peer's address and
    fail ("Connection refused") or hang in the group's start. On one node (one agent, so one
    restart count for every rank) each attempt starts the default group (DeepSpeed then adopts
    it) under a store prefix of its own. Agents of several nodes count restarts apart (a node
    whose ranks did not fail restarts them uncounted), so no prefix is safe there: the fix is a
    fresh store per attempt, which c10d gives with that variable. Others are left to DeepSpeed."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            log.warning("torchrun restarts on several nodes share one store with the failed attempt: export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (with --rdzv_backend c10d) so that each attempt "
                        "gets a fresh one")
        return
    from deepspeed.constants import default_pg_timeout

    timeout = timeout or default_pg_timeout
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    store = dist.PrefixStore(f"cimfast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            **_device_binding(backend, world))


def _device_binding(backend: str, world: int) -> dict:
    """device_id as DeepSpeed's own start passes it (NCCL then starts eagerly): on CUDA with
    more than one rank, not on torch 2.6.x-2.7.0, where binding it hangs."""
    from deepspeed.accelerator import get_accelerator
    from packaging import version

    hangs = version.parse("2.6.0") < version.parse(torch.__version__) < version.parse("2.7.1")
    if backend != "nccl" or world == 1 or hangs or get_accelerator().device_name() != "cuda":
        return {}
    return {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}


def init_distributed(timeout_minutes: Optional[float] = None) -> Place:
    """The process group (NCCL on CUDA, gloo on the CPU) and this process's place in it.
    ``timeout_minutes``: its collectives' timeout through start-up (None: DeepSpeed's default)."""
    fill_rendezvous_env()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    check_port()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
        start_attempt_group(backend, timeout.get("timeout"))
        deepspeed.init_distributed(dist_backend=backend, **timeout)
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
    return Place(dist.get_rank(), dist.get_world_size(), device)


def set_group_timeouts(seconds: float) -> None:
    """Every process group of this rank (the default one, DeepSpeed's and ZeRO's, cimfast's
    own gloo group) fails a collective begun from now on after ``seconds``. DeepSpeed's
    shared-memory all-reduce of CPU runs on one host has no timeout: the step watchdog
    bounds it instead."""
    if not dist.is_initialized():
        return
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # older torch
    for group in list(dist.distributed_c10d._world.pg_map):
        try:
            set_timeout(timedelta(seconds=seconds), group)
        except Exception as e:  # noqa: BLE001  (a backend that cannot: the step watchdog still bounds it)
            _warn_untimed(str(getattr(group, "group_name", group)), str(e))


@functools.lru_cache(maxsize=None)  # once a group: the timeout is set again at every phase change
def _warn_untimed(group: str, error: str) -> None:
    log.warning("process group %s keeps its own timeout (%s): the step watchdog bounds its waits", group, error)


SHM_DIR = "/dev/shm"


def unlink_shm_allreduce_name() -> None:
    """DeepSpeed's CPU all-reduce (used when its launcher starts every rank on one
    host) maps one 69 MB file per rank in /dev/shm, named by user, master address,
    port and rank, and never unlinks it: each CPU run on a new port would leave
    69 MB of memory per rank behind until reboot.
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
    torch.backends.cudnn.benchmark = run.cudnn_benchmark
    return run


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
