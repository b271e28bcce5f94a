"""Command line and JSON settings -> (Config, RunConfig, DeepSpeed config dict).

Precedence, lowest first: dataclass defaults and the preset, the
``"cimfast"`` section of the DeepSpeed JSON, the command line. The
``"cimfast"`` section is removed before the rest goes to DeepSpeed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import logging
import os
import sys
import typing
from dataclasses import fields

from cimfast.config.settings import Config, ConfigError, RunConfig, from_dict

SECTION = "cimfast"
log = logging.getLogger("cimfast")


def _arg_type(t):
    if typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


DESCRIPTION = ("Settings come from the dataclass defaults and the preset, then the \"cimfast\" section "
               "of --ds_config, then these flags. Everything else in --ds_config (batch sizes, optimizer, "
               "scheduler, bf16/fp16, ZeRO, clipping) is DeepSpeed's own.")


class Parser(argparse.ArgumentParser):
    """Flags are matched whole (a shortened flag is an error, not another setting), and an
    unknown flag's error names the flag it is close to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            import difflib

            actions = list(self._actions)
            for a in self._actions:  # the subcommands' flags too (evaluate knn/linear)
                if isinstance(a, argparse._SubParsersAction):
                    actions += [b for sub in a.choices.values() for b in sub._actions]
            known = sorted({o for a in actions for o in a.option_strings})
            for token in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.75)
                if token.startswith("--") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def build_parser(groups, prog: str, what: str, default_config: str = "ds_demo.json",
                 unused=(), defaults=None, helps=None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=f"{what} {DESCRIPTION}")
    p.add_argument("--ds_config", default=None,
                   help=f"DeepSpeed JSON config (default: configs/{default_config} beside the package)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    for group_name, cls in groups:
        g = p.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in unused:
                continue
            t = _arg_type(hints[f.name])
            default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
            text = (helps or {}).get(f.name, f.metadata.get("help", ""))
            kw = dict(default=None, help=text if "(default:" in text else f"{text} (default: {default})")
            if t is bool:
                g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
            elif t is tuple:  # of floats where the default holds floats (crop_scale), else of ints
                elem = float if any(isinstance(x, float) for x in default or ()) else int
                g.add_argument(f"--{f.name}", type=elem, nargs="+", **kw)
            else:
                g.add_argument(f"--{f.name}", type=t, **kw)
    return p


def default_ds_config(name: str) -> str:
    """A config that ships with cimfast: package data of ``cimfast.configs`` (the
    checkout's ``configs/`` folder, mapped there by the install)."""
    try:
        path = str(importlib.resources.files("cimfast.configs").joinpath(name))
    except ModuleNotFoundError:  # an install made before configs/ became package data
        raise ConfigError(f"ds_config: no --ds_config given and the shipped configs are not installed: "
                          f"re-run pip install -e . (or scripts/install.sh), or pass --ds_config configs/{name}")

    if not os.path.isfile(path):
        raise ConfigError(f"ds_config: no --ds_config given and the shipped config {name} is missing from {path}")
    return path


def read_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"ds_config: file {path} does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"ds_config: {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"ds_config: {path} must hold a JSON object")
    return d


GROUPS = (("model and objective", Config), ("run", RunConfig))


def refuse_unused(argv, section: dict, unused: dict, prog: str) -> None:
    """A setting this entry point would read and then ignore, given on the command line
    or in the JSON section, is an error naming what to use instead: a fine-tuning run
    given --data_path would otherwise fine-tune on the demo digits without a word."""
    given = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]
    given = [g[3:] if g.startswith("no-") and g[3:] in unused else g for g in given]
    for name, where in [(g, f"--{g}") for g in given] + [(k, f"{SECTION}.{k}") for k in section]:
        if name in unused:
            raise ConfigError(f"{where}: not a setting of {prog}: {unused[name]}")


def run_settings(run: RunConfig, unused=()) -> dict:
    """The run settings an entry point records (config.json, checkpoints): those it reads."""
    return {k: v for k, v in dataclasses.asdict(run).items() if k not in unused}


def parse(argv=None, groups=GROUPS, *, prog="cimfast.train", what="Corrupted Image Modeling pre-training.",
          default_config="ds_demo.json", unused=None, defaults=None, helps=None):
    """Returns (one instance per settings class..., DeepSpeed config, ds config path); raises ConfigError.

    Classes with a ``resolve()`` method (presets) are resolved; all are validated. ``unused``
    ({field: what to do instead}) names fields this entry point does not read: they are left
    out of --help and refused where given. ``defaults`` ({field: value}) replaces the
    dataclass defaults for this entry point (its own output folder, say); ``helps`` ({field:
    text}) its --help texts where the shared ones describe pre-training."""
    unused, defaults = unused or {}, defaults or {}
    argv = sys.argv[1:] if argv is None else list(argv)
    refuse_unused(argv, {}, unused, prog)  # before argparse, which would only say "unrecognized"
    args = build_parser(groups, prog, what, default_config, unused, defaults, helps).parse_args(argv)
    ds_path = args.ds_config or default_ds_config(default_config)
    ds = read_ds_config(ds_path)
    section = ds.pop(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: the \"{SECTION}\" section of {ds_path} must be a JSON object")
    refuse_unused([], section, unused, prog)
    classes = [c for _, c in groups]
    names = {c: {f.name for f in fields(c)} for c in classes}
    known = set().union(*names.values()) - set(unused)
    unknown = sorted(set(section) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.7)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{SECTION}.{unknown[0]}: unknown key in {ds_path}; {hint}known keys: "
                          f"{', '.join(sorted(known))}")
    out = []
    for c in classes:
        values = {k: v for k, v in defaults.items() if k in names[c]}
        values.update({k: v for k, v in section.items() if k in names[c]})
        for k in names[c] - set(unused):
            v = getattr(args, k)
            if v is not None:
                values[k] = tuple(v) if isinstance(v, list) else v
        obj = from_dict(c, values)
        obj.resolve() if hasattr(obj, "resolve") else obj.validate()
        out.append(obj)
    validate_ds_config(ds)
    return (*out, ds, ds_path)


# Top-level keys of the DeepSpeed config that cimfast's configs and README use; others are looked up
# among the setting names DeepSpeed's own modules define (only when a config has one).
DS_KEYS = frozenset((
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "amp", "timers", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
    "compile", "checkpoint", "data_types", "aio", "elasticity", "autotuning", "data_efficiency",
    "compression_training", "torch_autocast", "tensor_parallel", "pipeline", "sparse_attention"))


def _deepspeed_setting_names() -> set[str]:
    """The lower-case string constants of DeepSpeed's config modules: the names it reads settings by."""
    import deepspeed.runtime.config  # noqa: F401  (loads its constants modules)

    names = set()
    for name, mod in list(sys.modules.items()):
        if name.startswith("deepspeed") and mod is not None:
            names.update(v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str) and v.islower()
                         and v.replace("_", "").isalnum())
    return names


def check_ds_keys(ds: dict) -> None:
    """DeepSpeed ignores a top-level key it does not know, silently (a misspelled
    ``zero_optimisation`` trained without ZeRO). A key close to a known one is
    an error naming it; any other unknown key is a warning."""
    import difflib

    unknown = [k for k in ds if k not in DS_KEYS]
    if not unknown:
        return
    names = _deepspeed_setting_names() | DS_KEYS
    for k in unknown:
        if k in names:
            continue
        close = difflib.get_close_matches(k, DS_KEYS, n=1, cutoff=0.85) or \
            difflib.get_close_matches(k, names, n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"ds_config.{k}: not a DeepSpeed setting (DeepSpeed would ignore it without a word); "
                              f"did you mean {close[0]}?")
        log.warning("ds_config.%s: not a setting DeepSpeed is known to read; it is probably ignored", k)


def validate_ds_config(ds: dict) -> None:
    """The few DeepSpeed values cimfast relies on, checked before anything is built."""
    check_ds_keys(ds)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if k in ds and (not isinstance(ds[k], int) or isinstance(ds[k], bool) or ds[k] < 1):
            raise ConfigError(f"ds_config.{k}: must be a positive integer (got {ds[k]!r})")
    if not any(k in ds for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raise ConfigError("ds_config.train_batch_size: set train_batch_size or train_micro_batch_size_per_gpu")
    if "gradient_clipping" not in ds:
        log.warning("ds_config.gradient_clipping is not set: DeepSpeed then clips gradients at 1.0. "
                    "Write it explicitly (0 disables clipping).")
