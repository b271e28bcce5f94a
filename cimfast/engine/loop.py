"""The training loop shared by CIM pre-training, tokenizer training and
fine-tuning: the DeepSpeed engine, resume, the step loop.

Between log intervals the loop never reads the device: the non-finite skip
and the stop request are decided without a host sync (``cimfast.engine.guards``),
metrics accumulate on the device (``cimfast.engine.metrics.Meter``), and the next
batch's copy runs while the step computes (``cimfast.pipelines.prefetch``)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from cimfast.config.preflight import clear_previous_run, nothing_left_message
from cimfast.config.settings import InputError, RunConfig
from cimfast.engine import checkpoint
from cimfast.engine.distributed import Place, set_group_timeouts
from cimfast.engine.guards import NonFiniteGuard, StopRequest
from cimfast.engine.metrics import Meter, peak_flops
from cimfast.engine.outputs import Outputs
from cimfast.engine.patches import remove_clip_sync
from cimfast.engine.watchdog import StepWatchdog
from cimfast.pipelines.prefetch import DevicePrefetcher

log = logging.getLogger("cimfast")


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
    evaluate_first: bool = False  # also evaluate at step 0, before any update: the baseline later records beat
    state: Optional[Callable[[], dict]] = None  # () -> what the job accumulates (JSON), into every checkpoint
    load_state: Optional[Callable[[dict], None]] = None  # its inverse on resume; both called on all ranks


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
        # static shapes: the training step's shapes never change, and a dynamic-batch recompile of
        # the ResPix target's float64 cumsum can crash inductor (torch 2.11). A new shape (fine-tuning's
        # smaller last validation batch) costs one static compile of its own.
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


def start_state(engine, run: RunConfig, job: Job) -> dict:
    """The loop's state: fresh, or the checkpoint's that ``run.resume`` names
    (with what the job accumulated, handed back to it)."""
    state = {"step": 0, "micro_steps_consumed": 0, "nonfinite_total": 0}
    resume_path = resolve_resume(run)
    if not resume_path:
        return state
    state.update(checkpoint.load(engine, resume_path))
    log.info("resumed from %s at step %d", resume_path, state["step"])
    if job.load_state is not None:
        job.load_state(state.get("job_state") or {})
    planned = state.get("config", {}).get("max_steps")
    if planned is not None and planned != run.max_steps and state["step"] < run.max_steps:
        log.warning("the run was planned for %d steps and now runs to %d: from step %d on, what is "
                    "derived from the run's length is redrawn for %d steps (\"auto\" warmup and cosine "
                    "of the learning rate, the tokenizer's temperature and KL ramps)",
                    planned, run.max_steps, state["step"], run.max_steps)
    return state


def report(step: int, job: Job, engine, *, batches, guard: NonFiniteGuard, meter: Meter, outputs: Outputs,
           device: torch.device, max_nonfinite: int) -> int:
    """The log interval's one host read: metrics shown and written; non-zero (the exit
    code) when the run must stop for non-finite losses."""
    meter.waited(batches.take_wait())
    metrics = meter.report(step, guard.counters())
    metrics.update(log_extras(engine, device))
    if job.on_log is not None:
        metrics.update(job.on_log(step, metrics, engine))
    _, in_a_row = guard.read(metrics)
    outputs.show(step, metrics)
    return nonfinite_stop(in_a_row) if in_a_row >= max_nonfinite else 0


def run_job(job: Job, run: RunConfig, ds_cfg: dict, place: Place) -> int:
    """Train ``job`` from its start (or checkpoint) to ``run.max_steps``; the exit code."""
    engine = make_engine(job.model, ds_cfg, run, job.param_groups)
    state = start_state(engine, run, job)
    step = state["step"]
    if step >= run.max_steps:  # a finished run resumed (fine-tuning: its length comes from its epochs)
        log.info(nothing_left_message(job.name, step, run.max_steps))
        return 0
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    batches = DevicePrefetcher(job.batches(micro, state["micro_steps_consumed"]), place.device)
    guard = NonFiniteGuard(engine.optimizer, place.device, place.world, state["nonfinite_total"], run.max_nonfinite)
    peak = peak_flops(place.device, run.peak_tflops) if job.flops_per_image else None  # no FLOP count: no MFU
    meter = Meter(place.world, micro * gas * place.world, job.flops_per_image, peak, step)
    stopper = StopRequest(place.world)
    outputs = Outputs(job, run, engine, place.rank, step)
    watchdog = StepWatchdog(run.step_timeout_minutes, run.long_timeout_minutes, place.rank, set_group_timeouts)
    first = step
    log.info("%s: %d rank(s), micro-batch %d x %d accumulation = global batch %d; %s",
             job.name, place.world, micro, gas, micro * gas * place.world, job.summary)

    code, stopped = 0, False
    try:
        engine.train()
        if job.evaluate_first and step == 0:
            meter.since += outputs.evaluate(0)
        while step < run.max_steps and not stopped:
            watchdog.enter("training step", step + 1, long=step == first)  # the first step compiles
            train_step(engine, job, batches, guard, meter, state, step)
            if guard.exhausted:  # host path: the micro-batches kept failing
                code = nonfinite_stop(run.max_nonfinite)
                break
            step += 1
            outputs.advance()
            if step % run.log_interval == 0 or step == run.max_steps:
                code = report(step, job, engine, batches=batches, guard=guard, meter=meter, outputs=outputs,
                              device=place.device, max_nonfinite=run.max_nonfinite)
            if code:
                break
            watchdog.enter("checkpoint, evaluation or picture", step, long=True)
            meter.since += outputs.periodic(state, step)  # evaluation time stays out of the throughput
            watchdog.enter("the ranks' stop and clock agreement", step)
            stopped, due = stopper.agreed(outputs.clock_due())
            if due and not stopped and step < run.max_steps:
                watchdog.enter("checkpoint by the clock", step, long=True)
                outputs.save(state, step, "clock")
        watchdog.enter("the last checkpoint, evaluation and picture", step, long=True)
        state["nonfinite_total"] = guard.total_now()
        outputs.finish(state, step, code, stopped)
    except BaseException as e:
        outputs.abandon()  # what was logged reaches the disk before the error propagates
        watchdog.failed(e)
        raise
    watchdog.close()
    outputs.close(step)
    return code
