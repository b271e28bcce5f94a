"""cimfast's own settings: one typed dataclass, filled from the preset, the
``"cimfast"`` section of the DeepSpeed JSON and the command line (in that
order of precedence, lowest first). Unknown keys and wrong types are errors
that name the key."""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields

from cimfast.config.presets import PRESETS
from cimfast.kernels.pixel_loss import EPS as WINDOW_EPS
from cimfast.pipelines.demo import DIGITS, PHOTOS
from cimfast.pipelines.views import SCALE

OBJECTIVES = ("respix", "revdet")
PIPELINES = ("auto", "dali-gpu", "dali-cpu", "torch", "synthetic")


class InputError(ValueError):
    """A mistake in what the user gave (settings, paths, files, ports): the
    entry points print it as one line and exit with code 2 (``--debug`` shows
    the traceback). Tracebacks are for bugs."""


class ConfigError(InputError):
    pass


def require(obj, ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming ``key`` and its value unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg} (got {getattr(obj, key)!r})")


@dataclass
class Config:
    # --- model (None: taken from the preset) ---
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    objective: str = field(default="respix", metadata={"help": "respix (restore pixels) or revdet (detect replaced tokens)"})
    enhancer: typing.Optional[str] = field(default=None, metadata={"help": "vit or resnet"})
    img_size: typing.Optional[int] = field(default=None, metadata={"help": "enhancer input size in pixels"})
    patch_size: int = field(default=16, metadata={"help": "patch size (the tokenizer view is img_size / patch_size * 8)"})
    enhancer_dim: typing.Optional[int] = field(default=None, metadata={"help": "ViT enhancer width"})
    enhancer_depth: typing.Optional[int] = field(default=None, metadata={"help": "ViT enhancer depth"})
    enhancer_heads: typing.Optional[int] = field(default=None, metadata={"help": "ViT enhancer heads"})
    resnet_layers: typing.Optional[tuple] = field(default=None, metadata={"help": "ResNet blocks per stage"})
    resnet_width: typing.Optional[int] = field(default=None, metadata={"help": "ResNet stem width"})
    generator_dim: typing.Optional[int] = field(default=None, metadata={"help": "generator (small BEiT) width"})
    generator_depth: typing.Optional[int] = field(default=None, metadata={"help": "generator depth"})
    generator_heads: typing.Optional[int] = field(default=None, metadata={"help": "generator heads"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing per enhancer block"})
    # --- tokenizer ---
    tokenizer: typing.Optional[str] = field(default=None, metadata={"help": "tokenizer architecture: dalle or tiny"})
    tokenizer_path: typing.Optional[str] = field(default=None, metadata={
        "help": "folder with encoder.pkl + decoder.pkl (official DALL-E) or tokenizer.safetensors, or a .safetensors file"})
    encoder_sha256: typing.Optional[str] = field(default=None, metadata={"help": "pin the SHA-256 of encoder.pkl"})
    decoder_sha256: typing.Optional[str] = field(default=None, metadata={"help": "pin the SHA-256 of decoder.pkl"})
    # --- the CIM objective ---
    num_masked: typing.Optional[int] = field(default=None, metadata={"help": "masked patches per image"})
    min_block: typing.Optional[int] = field(default=None, metadata={"help": "smallest masking block in patches"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generator"})
    window: int = field(default=9, metadata={"help": "ResPix sliding normalization window (pixels)"})
    window_eps: float = field(default=WINDOW_EPS, metadata={
        "help": "ResPix target = (x - window mean) / sqrt(window variance + window_eps), pixels in [0, 1]; "
                "1e-4 (a std of 2.55/255) keeps flat windows from turning 8-bit quantization noise into "
                "unit-size targets (see cimfast.kernels.pixel_loss)"})
    enhancer_weight: float = field(default=1.0, metadata={"help": "loss = generator + enhancer_weight * enhancer"})
    knn_train_path: typing.Optional[str] = field(default=None, metadata={
        "help": "k-NN monitor: labelled train images (one subfolder per class), or demo (the digits); "
                "with knn_val_path, logs knn_top1 of the enhancer during pre-training"})
    knn_val_path: typing.Optional[str] = field(default=None, metadata={"help": "k-NN monitor: labelled val images"})
    knn_interval: int = field(default=1000, metadata={"help": "k-NN monitor: steps between runs (and at the end)"})

    def resolve(self) -> "Config":
        """Fill the preset's values into fields left at None and validate."""
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for k, v in PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        self.validate()
        return self

    def validate(self) -> None:
        need = functools.partial(require, self)
        need(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}")
        need(self.enhancer in ("vit", "resnet"), "enhancer", "must be vit or resnet")
        need(self.tokenizer in ("dalle", "tiny"), "tokenizer", "must be dalle or tiny")
        need(self.patch_size > 0, "patch_size", "must be positive")
        need(self.img_size > 0 and self.img_size % self.patch_size == 0, "img_size",
             f"must be a positive multiple of patch_size={self.patch_size}")
        n = self.grid ** 2
        need(0 < self.num_masked <= n, "num_masked", f"must be between 1 and the {n} patches of the image")
        need(0 < self.min_block <= self.num_masked, "min_block", f"must be between 1 and num_masked={self.num_masked}")
        need(self.temperature > 0, "temperature", "must be positive")
        need(self.window >= 2, "window", "must be at least 2 pixels")
        need(self.window_eps > 0, "window_eps", "must be positive")
        need(self.enhancer_weight >= 0, "enhancer_weight", "must not be negative")
        need((self.knn_train_path is None) == (self.knn_val_path is None), "knn_val_path",
             "the k-NN monitor needs both knn_train_path and knn_val_path")
        need(self.knn_interval >= 0, "knn_interval", "must not be negative")
        for k in ("generator_dim", "generator_depth", "generator_heads"):
            need(getattr(self, k) > 0, k, "must be positive")
        need(self.generator_dim % self.generator_heads == 0, "generator_dim", "must be divisible by generator_heads")
        if self.enhancer == "vit":
            for k in ("enhancer_dim", "enhancer_depth", "enhancer_heads"):
                need(getattr(self, k) is not None and getattr(self, k) > 0, k, "must be positive")
            need(self.enhancer_dim % self.enhancer_heads == 0, "enhancer_dim", "must be divisible by enhancer_heads")
        else:
            need(self.patch_size == 16, "patch_size", "must be 16 for the ResNet enhancer")
            need(self.resnet_layers is not None and len(self.resnet_layers) == 4, "resnet_layers", "needs 4 stages")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def tok_size(self) -> int:
        return self.grid * 8


def coerce(key: str, value, type_hints: dict):
    """Check one value against the field's type; ints are accepted for floats."""
    t = type_hints[key]
    optional = typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t)
    if optional:
        if value is None:
            return None
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is tuple and isinstance(value, list):
        return tuple(value)
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, float)
    else:
        ok = isinstance(value, t)
    if not ok:
        raise ConfigError(f"{key}: expected {t.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, d: dict):
    """Build a dataclass from a dict; unknown keys and wrong types name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
    return cls(**{k: coerce(k, v, hints) for k, v in d.items()})


@dataclass
class RunConfig:
    """Settings of a training run (everything that is not the model)."""

    data_path: typing.Optional[str] = field(default=None, metadata={
        "help": f"image folder (ImageNet-style tree) or file list, or {DIGITS} (the demo digits' train split); "
                f"unset or {PHOTOS}: the built-in demo photos"})
    output_dir: str = field(default="outputs/cim-demo", metadata={"help": "checkpoints, metrics, pictures"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps to train (the run's length)"})
    resume: typing.Optional[str] = field(default=None, metadata={
        "help": "'auto' (latest checkpoint in output_dir, if any) or a checkpoint folder"})
    seed: int = field(default=0, metadata={"help": "run seed: data order, crops, masks, token draws"})
    log_interval: int = field(default=10, metadata={"help": "steps between metric lines (the only host syncs)"})
    checkpoint_interval: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end)"})
    step_timeout_minutes: float = field(default=5.0, metadata={
        "help": "a training step (its collectives and data included) that makes no progress this long ends the "
                "run with exit code 5, naming the step and phase (a rank that stopped answering); plus a minute, "
                "every process group's collective timeout in training steps; 0: off"})
    long_timeout_minutes: float = field(default=60.0, metadata={
        "help": "the same bound for start-up, the first step (compilation), evaluations, checkpoints, pictures"})
    checkpoint_minutes: float = field(default=0.0, metadata={
        "help": "also checkpoint at the first step that ends this many minutes after the last checkpoint "
                "(wall clock; 0: off); beside checkpoint_interval, counted in keep_checkpoints"})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept (older ones are deleted)"})
    image_interval: int = field(default=100, metadata={"help": "steps between PNG pictures (0: only at the end)"})
    max_nonfinite: int = field(default=5, metadata={"help": "non-finite losses in a row that stop the run"})
    checkpoint_errors: str = field(default="stop", metadata={
        "help": "a checkpoint that cannot be written (full disk, I/O error, on any rank): stop (exit 4) or warn "
                "and train on; the last checkpoint of a run (end, signal, non-finite stop) always stops"})
    num_workers: int = field(default=2, metadata={
        "help": "DataLoader workers (torch pipeline) or Python source worker processes (DALI pipeline)"})
    pipeline: str = field(default="auto", metadata={
        "help": "input pipeline: auto (DALI on the GPU, else torch), dali-gpu, dali-cpu, "
                "torch, synthetic (batches made on the device, for compute-only benchmarks)"})
    dali_threads: int = field(default=0, metadata={
        "help": "DALI CPU threads per rank; 0: this rank's share of the cores"})
    validate_data: bool = field(default=True, metadata={
        "help": "check data_path once (cached by path, size and mtime) and train on the files that decode"})
    max_image_pixels: int = field(default=100_000_000, metadata={
        "help": "validation leaves out images with more pixels than this"})
    cache_dir: typing.Optional[str] = field(default=None, metadata={
        "help": "validation cache, clean file lists and the demo JPEGs (default: $CIMFAST_CACHE or ~/.cache/cimfast)"})
    demo_samples: int = field(default=4096, metadata={"help": "demo crops per epoch"})
    crop_scale: tuple = field(default=SCALE, metadata={
        "help": "the random resized crop's share of the image's area, min max (torchvision's and the paper's "
                f"{SCALE[0]} {SCALE[1]})"})
    peak_tflops: typing.Optional[float] = field(default=None, metadata={
        "help": "dense bf16 peak TFLOP/s per device for MFU (default: looked up by GPU name)"})
    compile: typing.Optional[bool] = field(default=None, metadata={
        "help": "torch.compile the trained networks and the tokenizer (default: on with CUDA, off on a CPU)"})
    tokenizer_bf16: typing.Optional[bool] = field(default=None, metadata={
        "help": "run the frozen tokenizer's residual groups in bf16, channels-last (default: on with CUDA)"})
    tokenizer_io_bf16: bool = field(default=False, metadata={
        "help": "with --tokenizer_bf16, its input and output convolutions in bf16 too (off: fp32, as DALL-E's own "
                "code; on changes tokens at near-ties; on by default only once a GPU measurement says it pays)"})
    tokenizer_fp8_logits: bool = field(default=False, metadata={
        "help": "the tokenizer encoder's output convolution (8192 logits a cell, argmax only) as one FP8 matmul "
                "(torch._scaled_mm, row-wise scales; needs sm_90 or newer); changes tokens at near-ties"})
    tokenizer_fuse: bool = field(default=False, metadata={
        "help": "with --compile: inductor lowers the tokenizer's 1x1 convolutions to matmuls and autotunes them "
                "with bias and ReLU fused in (longer start-up)"})
    cudnn_benchmark: bool = field(default=False, metadata={
        "help": "cuDNN autotunes each convolution's algorithm once (fixed shapes; a slower first step)"})
    pin_memory: typing.Optional[bool] = field(default=None, metadata={
        "help": "pinned host memory in the DataLoader for asynchronous copies (default: on with CUDA)"})
    progress: bool = field(default=True, metadata={
        "help": "rank 0's progress bar on a terminal (into a file: a log line per --log_interval instead)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start over in an output_dir that holds checkpoints (they and the metrics are removed)"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of input errors too"})

    def validate(self) -> None:
        need = functools.partial(require, self)
        need(self.max_steps > 0, "max_steps", "must be positive")
        need(self.log_interval > 0, "log_interval", "must be positive")
        for k in ("checkpoint_interval", "image_interval", "num_workers"):
            need(getattr(self, k) >= 0, k, "must not be negative")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        need(self.max_nonfinite >= 1, "max_nonfinite", "must be at least 1")
        need(self.checkpoint_errors in ("stop", "warn"), "checkpoint_errors", "must be stop or warn")
        need(self.checkpoint_minutes >= 0, "checkpoint_minutes", "must not be negative")
        need(self.step_timeout_minutes >= 0, "step_timeout_minutes", "must not be negative")
        need(self.long_timeout_minutes >= self.step_timeout_minutes, "long_timeout_minutes",
             "must be at least step_timeout_minutes")
        need(self.demo_samples > 0, "demo_samples", "must be positive")
        s = self.crop_scale
        need(len(s) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in s)
             and 0 < s[0] <= s[1] <= 1, "crop_scale", "must be two shares of the area, 0 < min <= max <= 1")
        self.crop_scale = tuple(float(x) for x in s)
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be positive")
        need(self.data_path is None or bool(self.data_path), "data_path", "must not be empty")
        need(self.pipeline in PIPELINES, "pipeline", f"must be one of {', '.join(PIPELINES)}")
        need(self.dali_threads >= 0, "dali_threads", "must not be negative")
        need(self.max_image_pixels > 0, "max_image_pixels", "must be positive")
