"""Full fine-tuning of a pre-trained enhancer: ``deepspeed cimfast/finetune.py --ds_config configs/ds_finetune_vit_base.json``.

The classifier is timm's (``vit_*`` of any width and depth, or ``resnet50``)
with the enhancer's weights loaded and a new head. The recipe is built from
timm's pieces: ``create_transform`` (random resized crop, flip,
RandAugment, random erasing), ``Mixup`` (mixup and cutmix, with label
smoothing), ``SoftTargetCrossEntropy`` / ``BinaryCrossEntropy`` and
``param_groups_layer_decay`` (layer-wise learning-rate decay), under the
same runtime as pre-training (DeepSpeed engine, checkpoints, exact resume,
SIGTERM, metrics, progress bar). Top-1 on the val folder is logged at each
evaluation (every epoch by default, and at the end).

Every recipe value is a setting; the shipped configs give the published
recipes, with their sources in ``recipe`` and in the README:
``ds_finetune_vit_base.json`` (MAE ViT-B), ``ds_finetune_vit_large.json``
(MAE ViT-L), ``ds_finetune_resnet50.json`` (ResNet strikes back A2).
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

import functools
import logging
import math
import random
import typing
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cimfast.config.cli import parse, run_settings
from cimfast.config.preflight import check_run, guarded, run_and_exit
from cimfast.config.settings import InputError, RunConfig, require
from cimfast.engine.distributed import (Place, engine_dtype, fill_auto, finish, init_distributed, resolve_cuda_defaults,
                                        setup_logging)
from cimfast.engine.loop import Job, run_job, write_config
from cimfast.engine.patches import patch_timm_posterize
from cimfast.evaluation.labelled import ViewSource, check_same_classes, labelled_files, normalized, resolve_paths
from cimfast.evaluation.loading import load_enhancer
from cimfast.models.timm_names import TIMM_VITS
from cimfast.objective.cim import IMAGENET_MEAN, IMAGENET_STD
from cimfast.pipelines.sampler import build_loader

log = logging.getLogger("cimfast")


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe. Defaults: MAE's ViT-B values (He et al. 2022, table 9 and
    facebookresearch/mae FINETUNE.md); the configs override them per model."""

    model: str = field(default="random", metadata={
        "help": "pre-trained enhancer: checkpoint folder, output directory, exported .safetensors, or random"})
    preset: str = field(default="tiny", metadata={"help": "with model random: whose enhancer"})
    train_path: typing.Optional[str] = field(default=None, metadata={
        "help": "labelled train folder (one subfolder per class), or demo (the digits)"})
    val_path: typing.Optional[str] = field(default=None, metadata={"help": "labelled val folder, or demo"})
    recipe: str = field(default="", metadata={"help": "where the recipe's values come from (recorded in config.json)"})
    epochs: typing.Optional[float] = field(default=None, metadata={
        "help": "training epochs; sets max_steps (MAE: 100 for ViT-B, 50 for ViT-L)"})
    warmup_epochs: float = field(default=5, metadata={
        "help": "linear warmup, when the scheduler's warmup_num_steps is auto (MAE: 5)"})
    img_size: typing.Optional[int] = field(default=None, metadata={
        "help": "input size (default: the pre-training size; ViT position embeddings are resampled)"})
    layer_decay: float = field(default=0.65, metadata={
        "help": "layer-wise lr decay: layer i of L gets lr x decay^(L+1-i) (MAE ViT-B 0.65, ViT-L 0.75; 1: off)"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate (MAE ViT-B 0.1, ViT-L 0.2)"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing (MAE 0.1)"})
    mixup: float = field(default=0.8, metadata={"help": "mixup alpha (MAE 0.8); 0: off"})
    cutmix: float = field(default=1.0, metadata={"help": "cutmix alpha (MAE 1.0); 0: off"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixup or cutmix per batch (MAE 1.0)"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix when both are on (MAE 0.5)"})
    auto_augment: str = field(default="rand-m9-mstd0.5-inc1", metadata={
        "help": "timm RandAugment policy (MAE: rand-m9-mstd0.5-inc1); '' off"})
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability (MAE 0.25, pixel mode)"})
    bce_loss: bool = field(default=False, metadata={
        "help": "binary cross-entropy instead of soft-target cross-entropy (ResNet strikes back)"})
    bce_target_thresh: typing.Optional[float] = field(default=None, metadata={
        "help": "binarize mixed targets above this value with bce_loss (RSB: 0.2)"})
    global_pool: str = field(default="avg", metadata={
        "help": "ViT: avg (mean of the patch tokens after the pre-trained final norm; MAE and BEiT put a new "
                "norm after the pooling instead) or token"})
    eval_interval: typing.Optional[int] = field(default=None, metadata={
        "help": "steps between val evaluations (default: one epoch; and at the end)"})

    def validate(self) -> None:
        need = functools.partial(require, self)
        need(self.train_path is not None and self.val_path is not None, "train_path",
             "fine-tuning needs --train_path and --val_path (class subfolders; demo: the digits)")
        need(self.epochs is None or self.epochs > 0, "epochs", "must be positive")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must not be negative")
        need(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        need(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        need(0 <= self.smoothing < 1, "smoothing", "must be in [0, 1)")
        for k in ("mixup", "cutmix", "reprob"):
            need(getattr(self, k) >= 0, k, "must not be negative")
        need(self.global_pool in ("avg", "token"), "global_pool", "must be avg or token")
        need(self.eval_interval is None or self.eval_interval > 0, "eval_interval", "must be positive")


GROUPS = (("fine-tuning recipe", FinetuneConfig), ("run", RunConfig))
_PRETRAINING = "it belongs to pre-training (cimfast/train.py); fine-tuning reads the labelled folders " \
               "through a torch DataLoader and draws no pictures"
# the run settings' help where pre-training's text would mislead
HELPS = {"seed": "run seed: data order, augmentation, mixup/cutmix draws, drop path",
         "compile": "torch.compile the classifier (default: on with CUDA, off on a CPU)",
         "num_workers": "DataLoader workers decoding and augmenting the labelled images",
         "cache_dir": "where the demo digits are written (default: $CIMFAST_CACHE or ~/.cache/cimfast)",
         "output_dir": "checkpoints, metrics, config.json"}
# run settings of pre-training that fine-tuning does not read: refused where given, not ignored
UNUSED = {"data_path": "give the labelled images with --train_path and --val_path (a subfolder of images per "
                       "class each)",
          "peak_tflops": "fine-tuning counts no FLOPs, so it reports no MFU",
          **{k: _PRETRAINING for k in ("image_interval", "tokenizer_bf16", "tokenizer_io_bf16", "tokenizer_fp8_logits",
                                       "tokenizer_fuse", "pipeline", "dali_threads", "validate_data",
                                       "max_image_pixels", "demo_samples", "crop_scale")}}


def build_classifier(fcfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """timm's model of the enhancer's architecture, with its weights and a new head."""
    import timm

    enhancer, cfg = load_enhancer(fcfg.model, fcfg.preset)
    sd = enhancer.timm_state_dict()
    if cfg["enhancer"] == "vit":
        name = TIMM_VITS.get(cfg["enhancer_dim"], ("vit_base_patch16_224",))[0]
        size = fcfg.img_size or cfg["img_size"]
        model = timm.create_model(name, num_classes=num_classes, drop_path_rate=fcfg.drop_path,
                                  global_pool=fcfg.global_pool, fc_norm=False, img_size=size,
                                  patch_size=cfg["patch_size"], embed_dim=cfg["enhancer_dim"],
                                  depth=cfg["enhancer_depth"], num_heads=cfg["enhancer_heads"])
        if size != cfg["img_size"]:
            from timm.layers import resample_abs_pos_embed

            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [size // cfg["patch_size"]] * 2, num_prefix_tokens=1)
        head = model.head
    else:
        if tuple(cfg["resnet_layers"]) != (3, 4, 6, 3) or cfg["resnet_width"] != 64:
            raise InputError(f"fine-tuning builds timm's model: the ResNet enhancer {cfg['resnet_layers']} of width "
                             f"{cfg['resnet_width']} has none (ResNet-50 and ViTs of any size do)")
        name, size = "resnet50", fcfg.img_size or cfg["img_size"]
        model = timm.create_model(name, num_classes=num_classes, drop_path_rate=fcfg.drop_path)
        head = model.fc
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p in ("weight", "bias")}
    if unexpected or set(missing) - new:
        raise InputError(f"the enhancer of {cfg['model']} does not fit timm's {name}: missing "
                         f"{sorted(set(missing) - new)[:3]}, unexpected {unexpected[:3]}")
    if cfg["enhancer"] == "vit":
        nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(head.bias)
    return model, {"timm_model": name, "img_size": size, "source": cfg["model"]}


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's (BEiT's) layer-decay groups, each with its own ``lr`` = lr x
    ``lr_scale``: DeepSpeed's schedulers scale every group's initial lr by
    the same factor, so the ratios hold through warmup and decay."""
    from timm.optim import param_groups_layer_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def seed_everything(*key: int) -> None:
    """Python's, NumPy's and torch's global generators from a key: timm's
    transforms, Mixup and drop path draw from them, so a sample's
    augmentation and a step's mixing and drop path are functions of the key
    (and a resumed run draws what an uninterrupted one does)."""
    s = int(np.random.SeedSequence(list(key)).generate_state(1)[0])  # keys of one tag have one length
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class AugmentedImages(torch.utils.data.Dataset):
    """Labelled files through timm's training transform; item (epoch, index)."""

    def __init__(self, files: list, labels: list, transform, seed: int):
        self.files, self.labels, self.transform, self.seed = files, labels, transform, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        from PIL import Image

        epoch, index = item
        seed_everything(self.seed, 0, epoch, index)  # tag 0: a sample's augmentation
        with Image.open(self.files[index]) as im:
            x = self.transform(im.convert("RGB"))
        return {"images": x, "labels": torch.tensor(self.labels[index])}


def train_transform(fcfg: FinetuneConfig, size: int):
    from timm.data import create_transform

    patch_timm_posterize()

    return create_transform(size, is_training=True, auto_augment=fcfg.auto_augment or None,
                            interpolation="bicubic", re_prob=fcfg.reprob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def criterion(fcfg: FinetuneConfig, mixing: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if fcfg.bce_loss:
        return BinaryCrossEntropy(smoothing=fcfg.smoothing, target_threshold=fcfg.bce_target_thresh)
    if mixing:
        return SoftTargetCrossEntropy()  # the smoothing is in Mixup's targets
    if fcfg.smoothing:
        return LabelSmoothingCrossEntropy(fcfg.smoothing)
    return nn.CrossEntropyLoss()


def main(argv=None) -> int:
    setup_logging()
    return guarded(lambda: finetune(argv), argv)


def parse_command(argv) -> tuple:
    """(fine-tuning settings, run settings, DeepSpeed config, its path) of a command line."""
    return parse(argv, GROUPS, prog="cimfast.finetune",
                 what="Fine-tune a pre-trained enhancer (full fine-tuning).",
                 default_config="ds_finetune_vit_base.json", unused=UNUSED,
                 defaults={"output_dir": "outputs/finetune"}, helps=HELPS)


def finetune(argv) -> int:
    fcfg, run, ds_cfg, ds_path = parse_command(argv)
    check_run(run, "finetune")
    train_path, val_path = resolve_paths(fcfg.train_path, fcfg.val_path, run.cache_dir)
    place = init_distributed(run.long_timeout_minutes)  # start-up may take long; run_job shortens it
    job = setup(fcfg, run, ds_cfg, ds_path, train_path, val_path, place, argv=sys.argv[1:] if argv is None else argv)
    code = run_job(job, run, ds_cfg, place)
    finish()
    return code


def setup(fcfg: FinetuneConfig, run: RunConfig, ds_cfg: dict, ds_path: str, train_path: str, val_path: str,
          place: Place, *, argv=None) -> Job:
    from timm.data import Mixup

    rank, world, device = place.rank, place.world, place.device
    resolve_cuda_defaults(run, device)
    files, labels, classes = labelled_files(train_path, run.cache_dir)
    vfiles, vlabels, vclasses = labelled_files(val_path, run.cache_dir)
    check_same_classes(train_path, classes, val_path, vclasses)
    torch.manual_seed(run.seed)
    model, info = build_classifier(fcfg, len(classes))

    micro = ds_cfg.get("train_micro_batch_size_per_gpu") or ds_cfg["train_batch_size"] // world
    global_batch = ds_cfg.get("train_batch_size") or micro * ds_cfg.get("gradient_accumulation_steps", 1) * world
    if len(files) < global_batch:
        raise InputError(f"train_batch_size: {train_path} has {len(files)} usable images, fewer than one global "
                         f"batch of {global_batch}: lower train_batch_size in the DeepSpeed config")
    steps_per_epoch = len(files) // global_batch
    if fcfg.epochs is not None and any(a.split("=")[0] == "--max_steps" for a in (argv or [])):
        log.info("--max_steps on the command line: the config's epochs (%g) are not used", fcfg.epochs)
        fcfg.epochs = None
    if fcfg.epochs is not None:
        run.max_steps = max(1, math.ceil(fcfg.epochs * steps_per_epoch))
        log.info("%g epochs of %d steps: max_steps %d (epochs sets the length; drop it to use --max_steps)",
                 fcfg.epochs, steps_per_epoch, run.max_steps)
    sched = ds_cfg.get("scheduler", {}).get("type")
    if fcfg.layer_decay < 1 and sched not in (None, "WarmupCosineLR"):
        raise InputError(f"layer_decay: the scheduler {sched} sets one lr for every parameter group; use "
                         "WarmupCosineLR (it scales each group's own lr) or layer_decay 1")
    if (fcfg.mixup > 0 or fcfg.cutmix > 0) and micro % 2:
        raise InputError(f"train_micro_batch_size_per_gpu: mixup and cutmix need an even micro-batch (got {micro})")
    params = ds_cfg.get("scheduler", {}).get("params", {})
    if params.get("warmup_num_steps") == "auto":
        warmup = round(fcfg.warmup_epochs * steps_per_epoch)
        if warmup >= run.max_steps:
            log.warning("warmup of %d epochs (%d steps) is longer than the run (%d steps): warming up over a "
                        "tenth of it", fcfg.warmup_epochs, warmup, run.max_steps)
            warmup = run.max_steps // 10
        params["warmup_num_steps"] = max(1, warmup)
    fill_auto(ds_cfg, run)
    opt = ds_cfg.get("optimizer", {}).get("params", {})
    groups = layer_decay_groups(model, opt.get("lr", 1e-3), opt.get("weight_decay", 0.0), fcfg.layer_decay)
    settings = {**asdict(fcfg), **run_settings(run, UNUSED), **info, "classes": classes,
                "steps_per_epoch": steps_per_epoch}
    write_config(run, rank, {"cimfast": settings, "deepspeed": ds_cfg, "ds_config_path": ds_path})
    model.to(device)
    dtype = engine_dtype(ds_cfg)

    mixing = fcfg.mixup > 0 or fcfg.cutmix > 0
    mixup = Mixup(mixup_alpha=fcfg.mixup, cutmix_alpha=fcfg.cutmix, prob=fcfg.mixup_prob,
                  switch_prob=fcfg.mixup_switch_prob, mode="batch", label_smoothing=fcfg.smoothing,
                  num_classes=len(classes)) if mixing else None
    loss_fn = criterion(fcfg, mixing)
    dataset = AugmentedImages(files, labels, train_transform(fcfg, info["img_size"]), run.seed)
    calls = {"step": -1, "n": 0}

    def forward(engine, batch, step):
        calls["n"] = calls["n"] + 1 if calls["step"] == step else 0
        calls["step"] = step
        seed_everything(run.seed, 1, step, calls["n"], rank)  # tag 1: this micro-step's mixing and drop path
        x, y = batch["images"], batch["labels"]
        if mixup is not None:
            x, y = mixup(x, y)
        logits = engine(x.to(dtype))
        return {"loss": loss_fn(logits.float(), y)}

    # this rank's share, padded so every rank runs the same number of forwards (ZeRO-3 gathers
    # parameters in each); the padding (index -1) is not counted
    val = ViewSource(vfiles, vlabels, info["img_size"], rank, world, run.num_workers)
    real = val.index >= 0

    def evaluate(module, step):
        sums = torch.zeros(4, device=device, dtype=torch.float64)  # top-1, top-5, loss, count
        at = 0
        for views, _ in val.batches():
            keep = real[at:at + len(views)].to(device)
            y = val.labels[at:at + len(views)].to(device)
            at += len(views)
            logits = module(normalized(views, device, dtype)).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.stack([((top[:, 0] == y) & keep).sum(), ((top == y[:, None]).any(1) & keep).sum(),
                                 (nn.functional.cross_entropy(logits, y, reduction="none") * keep).sum(),
                                 keep.sum()]).double()
        if world > 1:
            dist.all_reduce(sums)
        top1, top5, loss, n = sums.tolist()
        return {"val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n, "val_loss": loss / n}

    def batches(micro_batch, start):
        return iter(build_loader(dataset, micro_batch, rank, world, run.seed, start, run.num_workers,
                                 pin_memory=run.pin_memory))

    def on_log(step, metrics, engine):  # the layer decay at work: the head's lr and the patch embedding's
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        return {"lr_max": max(lrs), "lr_min": min(lrs)}

    return Job(name="finetune", model=model, forward=forward, config=settings, batches=batches, on_log=on_log,
               evaluate=evaluate, eval_interval=fcfg.eval_interval or steps_per_epoch, param_groups=groups,
               summary=f"timm {info['timm_model']} from {info['source']}, {len(classes)} classes, {len(files)} "
                       f"train / {len(vfiles)} val images, {steps_per_epoch} steps per epoch, "
                       f"{run.max_steps} steps")


def cli() -> None:
    """The script's and the console script cimfast-finetune's exit (see run_and_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    cli()
