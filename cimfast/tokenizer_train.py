"""Train a tokenizer (a discrete VAE of the DALL-E architecture) on your images.

    python -m cimfast.tokenizer_train --ds_config configs/ds_tokenizer_demo.json
    deepspeed cimfast/tokenizer_train.py --ds_config ds.json --data_path /data/train

Same input pipeline, DeepSpeed engine, checkpoints, resume, progress bar and
metrics as pre-training. At the end it writes ``tokenizer.safetensors`` (read
by ``--tokenizer_path`` like the official weights) and ``tokenizer_report.json``
(held-out reconstruction MSE and PSNR, codebook perplexity and usage) with a
picture of originals beside reconstructions.
"""
from __future__ import annotations

import os

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

import functools
import json
import logging
import typing
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from cimfast.config.cli import parse, run_settings
from cimfast.config.preflight import check_run, guarded, nothing_left, run_and_exit
from cimfast.config.settings import RunConfig, require
from cimfast.engine import checkpoint
from cimfast.engine.checkpoint import full_state_dict
from cimfast.engine.data import build_batches, build_image_dataset
from cimfast.engine.distributed import (Place, fill_auto, finish, init_distributed, resolve_cuda_defaults,
                                        setup_logging)
from cimfast.engine.loop import Job, run_job, write_config
from cimfast.pipelines.datasets import DemoDataset, FileListDataset, list_images
from cimfast.pipelines.demo import PHOTOS
from cimfast.pipelines.views import as_unit
from cimfast.tokenizer.dvae import beta_at, code_usage, codebook_stats, dvae_loss, psnr, tau_at
from cimfast.tokenizer.files import save_safetensors, tokenizer_from_state_dict
from cimfast.tokenizer.model import DALLE_SPEC, TINY_SPEC, Decoder, Encoder, Tokenizer, TokenizerSpec

log = logging.getLogger("cimfast")
SPECS = {"tiny": TINY_SPEC, "dalle": DALLE_SPEC}


@dataclass
class TokenizerConfig:
    """The dVAE and its recipe (DALL-E paper, section 2.1 and appendix A)."""

    architecture: str = field(default="tiny", metadata={"help": "tiny (the tiny preset's) or dalle (8192 codes)"})
    n_hid: typing.Optional[int] = field(default=None, metadata={"help": "base width (default: the architecture's)"})
    n_init: typing.Optional[int] = field(default=None, metadata={"help": "decoder input width"})
    n_blk_per_group: typing.Optional[int] = field(default=None, metadata={"help": "residual blocks per group"})
    vocab_size: typing.Optional[int] = field(default=None, metadata={"help": "codebook size"})
    image_size: int = field(default=56, metadata={"help": "training crop size (multiple of 8)"})
    tau_start: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature at the start"})
    tau_end: float = field(default=1 / 16, metadata={"help": "temperature reached at tau_steps"})
    tau_steps: typing.Optional[int] = field(default=None, metadata={"help": "annealing steps (default: max_steps)"})
    kl_weight: float = field(default=6.6, metadata={
        "help": "final weight of the per-cell KL to the uniform prior (DALL-E's convention); it makes each cell "
                "uncertain, not the cells different: the demo recipe for small data sets uses 0 with usage_weight 1"})
    kl_ramp_steps: typing.Optional[int] = field(default=None, metadata={"help": "KL ramp (default: max_steps / 4)"})
    usage_weight: float = field(default=0.0, metadata={
        "help": "weight of the codebook-usage term KL(code marginal || uniform); 0: DALL-E's recipe. "
                "On small data sets the codebook collapses without it (see cimfast.tokenizer.dvae.usage_kl)"})
    heldout_path: typing.Optional[str] = field(default=None, metadata={
        "help": "held-out images for the report (default: the demo's held-out photos with the demo data)"})
    heldout_samples: int = field(default=64, metadata={"help": "held-out crops in the report"})

    def validate(self) -> None:
        need = functools.partial(require, self)
        need(self.architecture in SPECS, "architecture", f"must be one of {', '.join(SPECS)}")
        need(self.image_size > 0 and self.image_size % 8 == 0, "image_size", "must be a positive multiple of 8")
        need(0 < self.tau_end <= self.tau_start, "tau_end", "must be in (0, tau_start]")
        for k in ("n_hid", "n_init", "n_blk_per_group", "vocab_size", "tau_steps", "kl_ramp_steps"):
            need(getattr(self, k) is None or getattr(self, k) >= 1, k, "must be positive")
        need(self.kl_weight >= 0, "kl_weight", "must not be negative")
        need(self.usage_weight >= 0, "usage_weight", "must not be negative")

    def spec(self) -> TokenizerSpec:
        base = asdict(SPECS[self.architecture])
        base.update({k: getattr(self, k) for k in ("n_hid", "n_init", "n_blk_per_group", "vocab_size")
                     if getattr(self, k) is not None})
        return TokenizerSpec(**base)


class DVAE(nn.Module):
    """The trainable dVAE: the tokenizer's encoder and decoder, unfrozen."""

    def __init__(self, spec: TokenizerSpec, usage_weight: float = 0.0):
        super().__init__()
        self.spec, self.usage_weight = spec, usage_weight
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)

    def forward(self, images, sample_keys, tau: float, beta: float):
        return dvae_loss(self, as_unit(images), tau, beta, sample_keys, usage_weight=self.usage_weight)


@torch.no_grad()
def evaluate(tok: Tokenizer, images: torch.Tensor, batch: int = 32) -> dict:
    """Hard-code reconstruction (tokenize -> decode, the path pre-training uses)."""
    ids, recon = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        t = tok.tokenize(x)
        ids.append(t)
        recon.append(tok.decode(t))
    ids, recon = torch.cat(ids), torch.cat(recon)
    stats = codebook_stats(ids, tok.vocab_size)
    return {"mse": float(((recon - images) ** 2).mean()), "psnr": psnr(recon, images), **stats,
            "codes_used": int(round(stats["used_fraction"] * tok.vocab_size)), "images": len(images)}, recon


def heldout_images(tcfg: TokenizerConfig, run: RunConfig) -> typing.Optional[torch.Tensor]:
    if tcfg.heldout_path:
        ds = FileListDataset(list_images(tcfg.heldout_path), tcfg.image_size, None, seed=run.seed + 1)
    elif run.data_path in (None, PHOTOS):
        ds = DemoDataset(tcfg.image_size, None, samples=tcfg.heldout_samples, split="heldout", seed=run.seed + 1)
    else:
        return None
    n = min(tcfg.heldout_samples, len(ds))
    return as_unit(torch.stack([ds[(0, i)]["images"] for i in range(n)]))


def save_reconstructions(images: torch.Tensor, recon: torch.Tensor, path: str, n: int = 16) -> None:
    from PIL import Image

    n = min(n, len(images))
    top = torch.cat(list(images[:n]), dim=2)
    bottom = torch.cat(list(recon[:n]), dim=2)
    grid = torch.cat([top, bottom], dim=1).clamp(0, 1)
    Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


GROUPS = (("tokenizer", TokenizerConfig), ("run", RunConfig))
# run settings of pre-training that tokenizer training does not read: refused where given, not ignored
UNUSED = {"tokenizer_bf16": "it is pre-training's setting for its frozen tokenizer; the one trained here runs in "
                            "the engine's precision (\"bf16\" in the config)",
          **{k: "it is pre-training's setting for its frozen tokenizer" for k in
             ("tokenizer_io_bf16", "tokenizer_fp8_logits", "tokenizer_fuse")},
          "peak_tflops": "tokenizer training counts no FLOPs, so it reports no MFU"}


def main(argv=None) -> int:
    setup_logging()
    return guarded(lambda: train_tokenizer(argv), argv)


def parse_command(argv) -> tuple:
    """(tokenizer settings, run settings, DeepSpeed config, its path) of a command line."""
    return parse(argv, GROUPS, prog="cimfast.tokenizer_train",
                 what="Train a DALL-E-architecture tokenizer (dVAE).",
                 default_config="ds_tokenizer_demo.json",
                 defaults={"output_dir": "outputs/tokenizer"}, unused=UNUSED)


def train_tokenizer(argv) -> int:
    tcfg, run, ds_cfg, ds_path = parse_command(argv)
    fill_auto(ds_cfg, run)
    check_run(run, "dvae")
    if nothing_left(run, "dvae"):  # a finished run resumed: nothing set up, written or evaluated again
        return 0
    place = init_distributed(run.long_timeout_minutes)  # start-up may take long; run_job shortens it
    job, heldout = setup(tcfg, run, ds_cfg, place)
    code = run_job(job, run, ds_cfg, place)
    ended = code == 0 and checkpoint.read_state(checkpoint.latest_checkpoint(run.output_dir))["reason"] == "end"
    if ended and place.rank == 0:  # not after a stop by signal: that run continues with --resume auto
        write_tokenizer(run, heldout)
    finish()
    return code


def setup(tcfg: TokenizerConfig, run: RunConfig, ds_cfg: dict,
          place: Place) -> tuple[Job, typing.Optional[torch.Tensor]]:
    """The dVAE job (built in one order, placed on ``place.device`` in one place) and the held-out images."""
    rank, world, device = place.rank, place.world, place.device
    resolve_cuda_defaults(run, device)
    spec = tcfg.spec()
    settings = {**asdict(tcfg), **run_settings(run, UNUSED), "spec": asdict(spec)}
    write_config(run, rank, {"cimfast": settings, "deepspeed": ds_cfg})
    dataset = build_image_dataset(run, tcfg.image_size, None, mask_fn=None)
    heldout = heldout_images(tcfg, run)
    torch.manual_seed(run.seed)
    model = DVAE(spec, tcfg.usage_weight).to(device)
    tau_steps = tcfg.tau_steps or run.max_steps
    ramp = tcfg.kl_ramp_steps or max(1, run.max_steps // 4)

    def forward(engine, batch, step):
        out = engine(batch["images"], batch["sample_key"], tau_at(step, tau_steps, tcfg.tau_start, tcfg.tau_end),
                     beta_at(step, ramp, tcfg.kl_weight))
        logits = out.pop("logits")
        return {**out, **code_usage(logits.argmax(1), spec.vocab_size)}  # on the device: no host read

    def picture(module, path):
        if heldout is None:
            return
        tok = tokenizer_from_state_dict({k: v.float().cpu() for k, v in module.state_dict().items()})
        _, recon = evaluate(tok, heldout[:16])  # on the CPU, off the training device
        if path:
            save_reconstructions(heldout[:16], recon, path)

    job = Job(name="dvae", model=model, forward=forward, config=settings, picture=picture,
              batches=lambda micro, start: build_batches(dataset, run, micro, start, device, rank, world),
              summary=f"codebook {spec.vocab_size}, width {spec.n_hid}, {tcfg.image_size} px crops")
    return job, heldout


def write_tokenizer(run: RunConfig, heldout: typing.Optional[torch.Tensor]) -> None:
    """``tokenizer.safetensors`` from the last checkpoint, and the held-out report."""
    tok = tokenizer_from_state_dict(full_state_dict(checkpoint.latest_checkpoint(run.output_dir)))
    out = os.path.join(run.output_dir, "tokenizer.safetensors")
    save_safetensors(tok, out, {"trained_by": "cimfast.tokenizer_train", "seed": str(run.seed),
                                "steps": str(run.max_steps)})
    report = {"tokenizer": out, "spec": asdict(tok.spec), "steps": run.max_steps}
    if heldout is not None:
        metrics, recon = evaluate(tok, heldout)
        report["heldout"] = metrics
        save_reconstructions(heldout, recon, os.path.join(run.output_dir, "reconstructions.png"))
    with open(os.path.join(run.output_dir, "tokenizer_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log.info("tokenizer written to %s; report: %s", out, json.dumps(report.get("heldout", {})))


def cli() -> None:
    """The script's exit (see run_and_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    cli()
