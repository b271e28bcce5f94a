"""CIM pre-training: ``deepspeed cimfast/train.py --ds_config ds.json``.

Also ``deepspeed --num_gpus N`` / ``--hostfile``, ``torchrun``, ``python -m
cimfast.train`` and plain ``python cimfast/train.py`` (single process: the
rendezvous defaults are filled in). With no data path it pre-trains the
``tiny`` preset on the built-in demo photographs.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

import json
from dataclasses import asdict

import torch

from cimfast.cli import parse
from cimfast.config import Config, ConfigError, RunConfig
from cimfast.runtime import Job, compile_enabled, fill_auto, finish, init_distributed, run_job, setup_logging


def main(argv=None) -> int:
    setup_logging()
    try:
        cfg, run, ds_cfg, ds_path = parse(argv)
    except ConfigError as e:
        print(f"cimfast: configuration error: {e}", file=sys.stderr)
        return 2
    fill_auto(ds_cfg, run)
    code = train(cfg, run, ds_cfg, ds_path)
    finish()
    return code


def train(cfg: Config, run: RunConfig, ds_cfg: dict, ds_path: str) -> int:
    from cimfast.cim import CIMModel, build_tokenizer
    from cimfast.dataloading import build_dataset, fixed_batch, to_device
    from cimfast.metrics import count_step_flops
    from cimfast.pictures import save_grid

    rank, world, device = init_distributed()
    settings = {**asdict(cfg), **asdict(run)}
    if rank == 0:
        os.makedirs(run.output_dir, exist_ok=True)
        with open(os.path.join(run.output_dir, "config.json"), "w") as f:
            json.dump({"cimfast": settings, "deepspeed": ds_cfg, "ds_config_path": ds_path}, f, indent=1)

    dataset = build_dataset(cfg, run)  # a bad data path fails before anything is built
    tokenizer = build_tokenizer(cfg).to(device)
    if run.tokenizer_bf16 if run.tokenizer_bf16 is not None else device.type == "cuda":
        tokenizer.fast(torch.bfloat16, compile=compile_enabled(run, device))
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = CIMModel(cfg, tokenizer)
    shown = fixed_batch(dataset, 8)
    flops = count_step_flops(model, shown)
    model.to(device)
    from cimfast.models.attention import probe

    probe(device, torch.bfloat16 if ds_cfg.get("bf16", {}).get("enabled") else
          torch.float16 if ds_cfg.get("fp16", {}).get("enabled") else torch.float32)

    def forward(engine, batch, step):
        return engine(batch["images"], batch["images_tok"], batch["mask"], batch["sample_key"])

    def picture(module, path):
        b = to_device(shown, device)
        out = module(b["images"], b["images_tok"], b["mask"], b["sample_key"], return_visuals=True)
        if path:
            save_grid(out["visuals"], cfg.patch_size, path)

    job = Job(name="cim", model=model, dataset=dataset, forward=forward, config=settings,
              flops_per_image=flops["total"], picture=picture,
              summary=f"preset {cfg.preset}, objective {cfg.objective}, {flops['total'] / 1e9:.2f} GFLOP per image "
                      f"per step (tokenizer {flops['tokenizer'] / 1e9:.2f})")
    return run_job(job, run, ds_cfg, rank, world, device)


if __name__ == "__main__":
    sys.exit(main())
