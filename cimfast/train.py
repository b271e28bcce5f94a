"""CIM pre-training: ``deepspeed cimfast/train.py --ds_config ds.json``.

Also ``deepspeed --num_gpus N`` / ``--hostfile``, ``torchrun``, ``python -m
cimfast.train`` and plain ``python cimfast/train.py`` (single process: the
rendezvous defaults are filled in). With no data path it pre-trains the
``tiny`` preset on the built-in demo photographs.
"""
from __future__ import annotations

import logging

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

from dataclasses import asdict

import torch

from cimfast.config.cli import parse, run_settings
from cimfast.config.preflight import check_run, guarded, nothing_left, run_and_exit
from cimfast.config.settings import Config, ConfigError, RunConfig
from cimfast.engine.data import build_batches, build_dataset, fixed_batch
from cimfast.engine.distributed import (Place, engine_dtype, fill_auto, finish, init_distributed, resolve_cuda_defaults,
                                        setup_logging)
from cimfast.engine.loop import Job, run_job, write_config
from cimfast.engine.metrics import count_step_flops
from cimfast.engine.pictures import save_grid
from cimfast.evaluation.knn import DEFAULT_FEATURES, LabelledSplits
from cimfast.kernels.dispatch import use_triton
from cimfast.models.attention import probe
from cimfast.objective.cim import CIMModel, build_tokenizer
from cimfast.objective.diagnostics import CodeMarginal, ReplacedWatch
from cimfast.tokenizer.model import Tokenizer

log = logging.getLogger("cimfast")


def main(argv=None) -> int:
    setup_logging()
    return guarded(lambda: pretrain(argv), argv)


def pretrain(argv) -> int:
    cfg, run, ds_cfg, ds_path = parse_command(argv)
    fill_auto(ds_cfg, run)
    check_run(run, "cim")  # every input error before DeepSpeed starts and before anything is written
    # the CUDA defaults resolved for the device init_distributed will pick, so the switches are checked
    # against what they become, before anything starts
    check_tokenizer_switches(resolve_cuda_defaults(run, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    if nothing_left(run, "cim"):  # a finished run resumed: nothing set up, written or evaluated again
        return 0
    tokenizer = build_tokenizer(cfg)
    place = init_distributed(run.long_timeout_minutes)  # start-up may take long; run_job shortens it
    code = run_job(setup(cfg, run, ds_cfg, ds_path, tokenizer, place), run, ds_cfg, place)
    finish()
    return code


def parse_command(argv) -> tuple:
    """(CIM settings, run settings, DeepSpeed config, its path) of a command line."""
    return parse(argv)


def setup(cfg: Config, run: RunConfig, ds_cfg: dict, ds_path: str, tokenizer: Tokenizer, place: Place) -> Job:
    """Everything the loop trains, built in one order and placed on ``device``
    in one place: data, then the model on the CPU beside the (CPU) tokenizer,
    FLOPs counted on the meta device, then both moved together, then the
    device-only set-up."""
    rank, world, device = place.rank, place.world, place.device
    resolve_cuda_defaults(run, device)
    settings = {**asdict(cfg), **run_settings(run)}
    write_config(run, rank, {"cimfast": settings, "deepspeed": ds_cfg, "ds_config_path": ds_path})
    dataset = build_dataset(cfg, run)  # a bad data path fails before anything is built
    shown = fixed_batch(dataset, 8)
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = CIMModel(cfg, tokenizer)
    flops = count_step_flops(lambda: CIMModel(cfg, Tokenizer(tokenizer.spec)), shown)

    tokenizer.to(device)
    model.to(device)
    if run.tokenizer_bf16 or run.tokenizer_fp8_logits:
        tokenizer.fast(torch.bfloat16 if run.tokenizer_bf16 else None, compile=run.compile,
                       io_dtype=run.tokenizer_io_bf16, fp8_logits=run.tokenizer_fp8_logits, fuse=run.tokenizer_fuse)
    probe(device, engine_dtype(ds_cfg))
    use_triton(torch.empty(0, device=device))  # logs the kernels' choice for this device, eagerly

    marginal = CodeMarginal(tokenizer.vocab_size, device)
    watch = ReplacedWatch(run.max_steps)
    knn_init: dict = {}  # the k-NN monitor at step 0: what pre-training must beat

    def forward(engine, batch, step):
        out = engine(batch["images"], batch["images_tok"], batch["mask"], batch["sample_key"])
        marginal.add(out.pop("code_counts"))
        return out

    def on_log(step, metrics, engine):
        extra = marginal.report(world)
        extra["gen_gap"] = extra["gen_loss_trivial"] - metrics["gen_loss"]
        watch.check(step, metrics["replaced_frac"])
        return extra

    monitor = None
    if cfg.knn_train_path:  # this rank's share, decoded once and kept in memory (up to 1 GiB)
        monitor = LabelledSplits(cfg.knn_train_path, cfg.knn_val_path, cfg.img_size, rank, world, run.cache_dir,
                                 run.num_workers, cache_bytes=2**30)
        log.info("k-NN monitor: %d train and %d val images of %d classes, every %d steps",
                 monitor.sizes["train"], monitor.sizes["val"], len(monitor.classes), cfg.knn_interval)

    def evaluate(module, step):
        res = monitor.knn(module.enhancer, device)
        found = {f"knn_top{n}" + ("" if kind in DEFAULT_FEATURES else f"_{kind}"): r[f"top{n}"]
                 for kind, r in res.items() for n in (1, 5)}
        if step == 0:  # before any update: logged once, kept in every checkpoint
            knn_init.update(found)
            return {f"{k}_init": v for k, v in found.items()}
        return {**found, **{f"{k}_gain": v - knn_init[k] for k, v in found.items() if k in knn_init}}

    def job_state():
        return {"code_counts": marginal.state(world), "replaced_watch": watch.state(), "knn_init": knn_init}

    def load_job_state(s):
        marginal.load(s.get("code_counts"), rank)
        watch.load(s.get("replaced_watch"))
        knn_init.update(s.get("knn_init") or {})

    def picture(module, path):
        b = {k: v.to(device) for k, v in shown.items()}
        # forward, not __call__: eager, not the compiled step, whose static shapes a picture's
        # batch of 8 with visuals would recompile at every picture.
        out = module.forward(b["images"], b["images_tok"], b["mask"], b["sample_key"], return_visuals=True)
        if path:
            save_grid(out["visuals"], cfg.patch_size, path)

    return Job(name="cim", model=model, forward=forward, config=settings, picture=picture,
               batches=lambda micro, start: build_batches(dataset, run, micro, start, device, rank, world),
               flops_per_image=flops["total"], on_log=on_log,
               evaluate=evaluate if monitor else None, eval_interval=cfg.knn_interval,
               evaluate_first=monitor is not None, state=job_state, load_state=load_job_state,
               summary=f"preset {cfg.preset}, objective {cfg.objective}, {flops['total'] / 1e9:.2f} GFLOP per "
                       f"image per step (tokenizer {flops['tokenizer'] / 1e9:.2f})")


def check_tokenizer_switches(run: RunConfig) -> None:
    """The tokenizer's speed switches need what they modify: an error, not a switch silently off.
    ``run``'s CUDA defaults are resolved (``resolve_cuda_defaults``)."""
    if run.tokenizer_io_bf16 and not run.tokenizer_bf16:
        raise ConfigError("tokenizer_io_bf16: needs --tokenizer_bf16 (the input and output convolutions join the "
                          "bf16 fast path)")
    if run.tokenizer_fp8_logits and torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0):
        raise ConfigError(f"tokenizer_fp8_logits: needs a GPU with row-wise scaled FP8 matmuls (sm_90 or newer); "
                          f"this one is sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    if run.tokenizer_fuse and not (run.compile and (run.tokenizer_bf16 or run.tokenizer_fp8_logits)):
        raise ConfigError("tokenizer_fuse: needs --compile and the tokenizer's fast path (--tokenizer_bf16)")


def cli() -> None:
    """The script's and the console script cimfast-train's exit (see run_and_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    cli()
