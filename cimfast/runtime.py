"""The training loop shared by CIM pre-training and tokenizer training:
distributed start, the DeepSpeed engine, resume, the step loop with its one
agreed flag per micro-step, metrics, checkpoints and pictures."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cimfast import checkpoint
from cimfast.config import RunConfig

log = logging.getLogger("cimfast")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s cimfast %(levelname)s: %(message)s", datefmt="%H:%M:%S")


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
    """``"auto"`` in the scheduler's step counts: derived from --max_steps."""
    params = ds.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = run.max_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, run.max_steps // 10)
    return ds


def init_distributed() -> tuple[int, int, torch.device]:
    fill_rendezvous_env()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def compile_enabled(run: RunConfig, device: torch.device) -> bool:
    return run.compile if run.compile is not None else device.type == "cuda"


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
    if run.resume == "auto":
        return checkpoint.latest_checkpoint(run.output_dir)
    if run.resume:
        if not os.path.isfile(os.path.join(run.resume, checkpoint.STATE_FILE)):
            raise SystemExit(f"cimfast: --resume {run.resume} is not a finished checkpoint folder")
        return run.resume
    return None


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once; repeated SIGTERMs
            signal.signal(signum, signal.SIG_DFL)  # (launchers forward them) are absorbed


def agree(nonfinite: torch.Tensor, stop: bool, device) -> tuple[bool, bool]:
    """All ranks agree whether this micro-step's loss is non-finite (skip it)
    and whether a stop was requested. This is the one host sync per
    micro-step: skipping an update has to be decided before it happens, on
    every rank alike."""
    flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_all = flags.tolist()
    return bad > 0, stop_all > 0


@dataclass
class Job:
    """What a training loop needs to know about the model it trains."""

    name: str
    model: torch.nn.Module
    dataset: object
    forward: Callable  # (engine, batch on device, step) -> dict of scalar tensors with "loss"
    config: dict  # saved into every checkpoint
    flops_per_image: float = 0.0  # for MFU; 0: not reported
    picture: Optional[Callable] = None  # (module, path) -> None, called on all ranks
    summary: str = ""


def run_job(job: Job, run: RunConfig, ds_cfg: dict, rank: int, world: int, device: torch.device) -> int:
    import deepspeed

    from cimfast.dataloading import build_batches, to_device
    from cimfast.metrics import MetricsWriter, peak_flops, read_metrics
    from cimfast.pictures import save_loss_plot

    resume_path = resolve_resume(run)
    engine, _, _, _ = deepspeed.initialize(model=job.model, model_parameters=param_groups(job.model),
                                           config=ds_cfg)
    if compile_enabled(run, device):
        engine.compile()
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    global_batch = micro * gas * world

    state = {"step": 0, "micro_steps_consumed": 0, "nonfinite_total": 0}
    if resume_path:
        state.update(checkpoint.load(engine, resume_path))
        log.info("resumed from %s at step %d", resume_path, state["step"])
    step = state["step"]
    if step >= run.max_steps:
        log.info("the checkpoint is at step %d >= --max_steps %d: nothing to do", step, run.max_steps)

    batches = build_batches(None, run, rank, world, micro, state["micro_steps_consumed"], device, dataset=job.dataset)
    peak = peak_flops(device, run.peak_tflops)
    writer = MetricsWriter(run.output_dir, step) if rank == 0 else None
    stopper = StopRequest()
    if rank == 0:
        log.info("%s: %d rank(s), micro-batch %d x %d accumulation = global batch %d%s", job.name, world, micro, gas,
                 global_batch, f"; {job.summary}" if job.summary else "")
    bar = None
    if rank == 0 and run.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.max_steps, initial=step, desc=job.name, dynamic_ncols=True)

    def save(reason: str):
        state.update(step=step, config=job.config, reason=reason)
        path = checkpoint.save(engine, run.output_dir, step, state, run.keep_checkpoints, rank)
        if rank == 0:
            log.info("checkpoint (%s): %s", reason, path)

    def picture(name: str):
        if job.picture is None:
            return
        was_training = engine.module.training
        engine.module.eval()
        with torch.no_grad():
            job.picture(engine.module, os.path.join(run.output_dir, name) if rank == 0 else None)
        engine.module.train(was_training)

    sums: dict[str, torch.Tensor] = {}
    n_micro, wait, t_last, nonfinite_row, step_at_log = 0, 0.0, time.perf_counter(), 0, step
    exit_code, stop = 0, False
    engine.train()
    while step < run.max_steps and not stop:
        micro_done = 0
        while micro_done < gas:
            t0 = time.perf_counter()
            batch = to_device(next(batches), device)
            wait += time.perf_counter() - t0
            out = job.forward(engine, batch, step)
            bad, stop = agree(~torch.isfinite(out["loss"].detach()), stopper.requested, device)
            if stop and micro_done == 0:
                break  # this batch is not consumed: a resumed run starts with it
            state["micro_steps_consumed"] += 1
            if bad:
                state["nonfinite_total"] += 1
                nonfinite_row += 1
                log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)", step + 1, nonfinite_row)
                if nonfinite_row >= run.max_nonfinite:
                    save("non-finite losses")
                    log.error("%d non-finite losses in a row: stopping. Lower the learning rate, check the "
                              "data, or use bf16 instead of fp16; resume with --resume auto.", nonfinite_row)
                    exit_code = 3
                    break
                continue
            nonfinite_row = 0
            engine.backward(out["loss"])
            engine.step()
            micro_done += 1
            n_micro += 1
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    sums[k] = sums.get(k, 0) + v.detach().float()
        if exit_code or (stop and micro_done == 0):
            break
        step += 1
        if bar is not None:
            bar.update(1)
        if step % run.log_interval == 0 or step == run.max_steps:
            now = time.perf_counter()
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]) / max(1, n_micro)
            if world > 1:
                dist.all_reduce(vec)
                vec /= world
            metrics = dict(zip(keys, vec.tolist()))  # the logging sync
            steps, secs = step - step_at_log, now - t_last
            ips = steps * global_batch / secs
            metrics.update(lr=engine.get_lr()[0], img_per_s=ips, img_per_s_per_device=ips / world,
                           data_wait=wait / secs, step_time=secs / steps, nonfinite_total=state["nonfinite_total"])
            gn = engine.get_global_grad_norm()
            if gn is not None:
                metrics["grad_norm"] = float(gn)
            if peak and job.flops_per_image:
                metrics["mfu"] = ips / world * job.flops_per_image / peak
            if device.type == "cuda":
                metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                writer.write(step, metrics)
                if bar is not None:
                    post = {k: f"{metrics[k]:.4g}" for k in ("loss", "gen_loss", "enh_loss", "mse") if k in metrics}
                    post["img/s"] = f"{ips:.1f}"
                    if "mfu" in metrics:
                        post["mfu"] = f"{metrics['mfu']:.1%}"
                    bar.set_postfix(post)
                else:
                    log.info("step %d: %s", step, json.dumps({k: round(v, 5) for k, v in metrics.items()}))
            sums, n_micro, wait, t_last, step_at_log = {}, 0, 0.0, time.perf_counter(), step
        if run.checkpoint_interval and step % run.checkpoint_interval == 0 and step < run.max_steps:
            save("interval")
        if run.image_interval and step % run.image_interval == 0:
            picture(f"picture_step{step:08d}.png")

    if bar is not None:
        bar.close()
    if exit_code == 0:
        if stop and step < run.max_steps:
            save("signal")
            log.info("stopped by signal at step %d; continue with --resume auto", step)
        else:
            save("end")
            picture("picture_final.png")
    if rank == 0:
        writer.close()
        records = read_metrics(run.output_dir)
        if records:
            save_loss_plot(records, os.path.join(run.output_dir, "loss.png"))
        log.info("done: step %d, outputs in %s", step, run.output_dir)
    return exit_code


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
