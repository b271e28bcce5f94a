"""Command line and JSON settings -> (Config, RunConfig, DeepSpeed config dict).

Precedence, lowest first: dataclass defaults and the preset, the
``"cimfast"`` section of the DeepSpeed JSON, the command line. The
``"cimfast"`` section is removed before the rest goes to DeepSpeed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import typing
from dataclasses import fields

from cimfast.config import Config, ConfigError, RunConfig, from_dict

SECTION = "cimfast"
log = logging.getLogger("cimfast")


def _arg_type(t):
    if typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


DESCRIPTION = ("Settings come from the dataclass defaults and the preset, then the \"cimfast\" section "
               "of --ds_config, then these flags. Everything else in --ds_config (batch sizes, optimizer, "
               "scheduler, bf16/fp16, ZeRO, clipping) is DeepSpeed's own.")


def build_parser(groups, prog: str, what: str, default_config: str = "ds_demo.json") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=f"{what} {DESCRIPTION}")
    p.add_argument("--ds_config", default=None,
                   help=f"DeepSpeed JSON config (default: configs/{default_config} beside the package)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    for group_name, cls in groups:
        g = p.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            t = _arg_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            kw = dict(default=None, help=f.metadata.get("help", "") + f" (default: {default})")
            if t is bool:
                g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
            elif t is tuple:
                g.add_argument(f"--{f.name}", type=int, nargs="+", **kw)
            else:
                g.add_argument(f"--{f.name}", type=t, **kw)
    return p


def default_ds_config(name: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "configs", name), os.path.join(here, "configs", name)):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    raise ConfigError(f"ds_config: no --ds_config given and configs/{name} was not found")


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


def parse(argv=None, groups=GROUPS, prog="cimfast.train", what="Corrupted Image Modeling pre-training.",
          default_config="ds_demo.json"):
    """Returns (one instance per settings class..., DeepSpeed config, ds config path); raises ConfigError.

    Classes with a ``resolve()`` method (presets) are resolved; all are validated."""
    args = build_parser(groups, prog, what, default_config).parse_args(argv)
    ds_path = args.ds_config or default_ds_config(default_config)
    ds = read_ds_config(ds_path)
    section = ds.pop(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: the \"{SECTION}\" section of {ds_path} must be a JSON object")
    classes = [c for _, c in groups]
    names = {c: {f.name for f in fields(c)} for c in classes}
    known = set().union(*names.values())
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{SECTION}.{unknown[0]}: unknown key in {ds_path}; known keys: {', '.join(sorted(known))}")
    out = []
    for c in classes:
        values = {k: v for k, v in section.items() if k in names[c]}
        for k in names[c]:
            v = getattr(args, k)
            if v is not None:
                values[k] = tuple(v) if isinstance(v, list) else v
        obj = from_dict(c, values)
        obj.resolve() if hasattr(obj, "resolve") else obj.validate()
        out.append(obj)
    validate_ds_config(ds)
    return (*out, ds, ds_path)


def validate_ds_config(ds: dict) -> None:
    """The few DeepSpeed values cimfast relies on, checked before anything is built."""
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if k in ds and (not isinstance(ds[k], int) or isinstance(ds[k], bool) or ds[k] < 1):
            raise ConfigError(f"ds_config.{k}: must be a positive integer (got {ds[k]!r})")
    if not any(k in ds for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raise ConfigError("ds_config.train_batch_size: set train_batch_size or train_micro_batch_size_per_gpu")
    if "gradient_clipping" not in ds:
        log.warning("ds_config.gradient_clipping is not set: DeepSpeed then clips gradients at 1.0. "
                    "Write it explicitly (0 disables clipping).")
