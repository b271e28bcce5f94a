"""CIM pre-training: ``deepspeed cimfast/train.py --ds_config ds.json``.

Also ``torchrun``, ``python -m cimfast.train`` and plain ``python
cimfast/train.py`` (single process: rendezvous defaults are filled in).
With no data path it pre-trains the ``tiny`` preset on the built-in demo
photographs. One loop, top-down: settings -> engine -> resume -> steps
(host syncs only at the logging interval, plus one flag per micro-step: see
``_agree``) -> checkpoint, pictures and plots.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts cimfast/ first on sys.path, where module
    # names like config or metrics could shadow other packages: use the
    # installed package (or this checkout) instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    try:
        import cimfast  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(_here))

import json
import logging
import math
import signal
import socket
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from cimfast import checkpoint
from cimfast.cli import parse
from cimfast.config import Config, ConfigError, RunConfig

log = logging.getLogger("cimfast")


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
    """``"auto"`` in the scheduler's step counts means: derived from --max_steps."""
    params = ds.get("scheduler", {}).get("params", {})
    for key in ("total_num_steps",):
        if params.get(key) == "auto":
            params[key] = run.max_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, run.max_steps // 10)
    return ds


def param_groups(model: torch.nn.Module) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and learned tokens (BEiT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def _agree(nonfinite: torch.Tensor, stop: bool, device) -> tuple[bool, bool]:
    """All ranks agree whether this micro-step's loss is non-finite (skip it)
    and whether a stop was requested. This is the one host sync per
    micro-step: skipping an update has to be decided before it happens, on
    every rank alike."""
    flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_all = flags.tolist()
    return bad > 0, stop_all > 0


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s cimfast %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    rank_env = int(os.environ.get("RANK", "0"))
    setup_logging(rank_env)
    try:
        cfg, run, ds_cfg, ds_path = parse(argv)
    except ConfigError as e:
        print(f"cimfast: configuration error: {e}", file=sys.stderr)
        return 2
    fill_auto(ds_cfg, run)
    return train(cfg, run, ds_cfg, ds_path)


def train(cfg: Config, run: RunConfig, ds_cfg: dict, ds_path: str) -> int:
    fill_rendezvous_env()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    from cimfast.cim import CIMModel, build_tokenizer
    from cimfast.dataloading import build_dataset, build_loader, fixed_batch, to_device
    from cimfast.metrics import MetricsWriter, count_step_flops, peak_flops, read_metrics
    from cimfast.pictures import save_grid, save_loss_plot

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank == 0:
        os.makedirs(run.output_dir, exist_ok=True)
        with open(os.path.join(run.output_dir, "config.json"), "w") as f:
            json.dump({"cimfast": {**asdict(cfg), **asdict(run)}, "deepspeed": ds_cfg, "ds_config_path": ds_path},
                      f, indent=1)

    # Resume point first: a bad --resume is an error before anything is built.
    resume_path = None
    if run.resume == "auto":
        resume_path = checkpoint.latest_checkpoint(run.output_dir)
    elif run.resume:
        resume_path = run.resume
        if not os.path.isfile(os.path.join(resume_path, checkpoint.STATE_FILE)):
            raise SystemExit(f"cimfast: --resume {resume_path} is not a finished checkpoint folder")

    dataset = build_dataset(cfg, run)  # a bad data path fails before anything is built
    tokenizer = build_tokenizer(cfg).to(device)
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = CIMModel(cfg, tokenizer)
    pictures = fixed_batch(dataset, 8)
    flops = count_step_flops(model, pictures)
    model.to(device)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_cfg)
    if run.compile:
        engine.compile()
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    global_batch = micro * gas * world

    state = {"step": 0, "micro_steps_consumed": 0, "nonfinite_total": 0}
    if resume_path:
        state.update(checkpoint.load(engine, resume_path))
        log.info("resumed from %s at step %d", resume_path, state["step"])
    step = state["step"]

    loader = build_loader(dataset, micro, rank, world, run.seed, state["micro_steps_consumed"],
                          run.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    peak = peak_flops(device, run.peak_tflops)
    writer = MetricsWriter(run.output_dir, step) if rank == 0 else None
    stopper = StopRequest()
    if rank == 0:
        log.info("preset %s, objective %s, %d rank(s), micro-batch %d x %d accumulation = global batch %d; "
                 "%.2f GFLOP per image per step (tokenizer %.2f)", cfg.preset, cfg.objective, world, micro, gas,
                 global_batch, flops["total"] / 1e9, flops["tokenizer"] / 1e9)
    bar = None
    if rank == 0 and run.progress:
        from tqdm import tqdm

        bar = tqdm(total=run.max_steps, initial=step, desc="cim", dynamic_ncols=True)

    def save(reason: str):
        state.update(step=step, config={**asdict(cfg), **asdict(run)}, reason=reason)
        path = checkpoint.save(engine, run.output_dir, step, state, run.keep_checkpoints, rank)
        if rank == 0:
            log.info("checkpoint (%s): %s", reason, path)

    def picture(name: str):
        was_training = engine.module.training
        engine.module.eval()
        with torch.no_grad():
            batch = to_device(pictures, device)
            out = engine.module(batch["images"], batch["images_tok"], batch["mask"], batch["sample_key"],
                                return_visuals=True)
        engine.module.train(was_training)
        if rank == 0:
            save_grid(out["visuals"], cfg.patch_size, os.path.join(run.output_dir, name))

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
            out = engine(batch["images"], batch["images_tok"], batch["mask"], batch["sample_key"])
            bad, stop = _agree(~torch.isfinite(out["loss"].detach()), stopper.requested, device)
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
                if k != "visuals":
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
            steps = step - step_at_log
            secs = now - t_last
            ips = steps * global_batch / secs
            metrics.update(lr=engine.get_lr()[0], img_per_s=ips, img_per_s_per_device=ips / world,
                           data_wait=wait / secs, step_time=secs / steps,
                           nonfinite_total=state["nonfinite_total"])
            gn = engine.get_global_grad_norm()
            if gn is not None:
                metrics["grad_norm"] = float(gn)
            if peak:
                metrics["mfu"] = ips / world * flops["total"] / peak
            if device.type == "cuda":
                metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                writer.write(step, metrics)
                if bar is not None:
                    post = {k: f"{metrics[k]:.4g}" for k in ("loss", "gen_loss", "enh_loss") if k in metrics}
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
            exit_code = 0
        else:
            save("end")
            picture("picture_final.png")
    if rank == 0:
        writer.close()
        records = read_metrics(run.output_dir)
        if records:
            save_loss_plot(records, os.path.join(run.output_dir, "loss.png"))
        log.info("done: step %d, outputs in %s", step, run.output_dir)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
