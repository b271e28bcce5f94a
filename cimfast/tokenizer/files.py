"""Reading and writing tokenizer files.

The official DALL-E ``encoder.pkl`` / ``decoder.pkl`` are pickles of whole
Python modules: ``load_official_pickle`` reads them with a restricted
unpickler that rebuilds tensors and the known classes only (anything else is
refused before it can run), and the weights are copied into freshly built
modules of ``cimfast.tokenizer.model`` and cached as safetensors.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.nn as nn

from cimfast.config.settings import InputError
from cimfast.pipelines.atomic import write_atomically
from cimfast.tokenizer.model import Tokenizer, spec_from_state_dicts

OFFICIAL_HINT = (
    "Download the official DALL-E tokenizer files encoder.pkl and decoder.pkl "
    "(the links are in the README of the openai/DALL-E repository) and pass the "
    "folder that holds them with --tokenizer_path, or train your own with "
    "`python -m cimfast.tokenizer_train`."
)


# --------------------------------------------------------------------------
# Loading: official pickles (restricted), safetensors (ours)
# --------------------------------------------------------------------------
class TokenizerFileError(InputError):
    """Every problem with tokenizer files: one type, and always the same hint."""

    def __init__(self, msg: str):
        super().__init__(f"{msg}. {OFFICIAL_HINT}")



# Classes a DALL-E pickle may name, mapped to what rebuilds them here. The
# stand-ins for dall_e.* only receive the pickled attribute dicts; weights are
# read from them with state_dict() and nothing of theirs is ever called.
class _Stub(nn.Module):
    pass


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 names
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "device"): torch.device,
    ("torch.nn.modules.container", "Sequential"): nn.Sequential,
    ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
    ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
    ("torch.nn.modules.upsampling", "Upsample"): nn.Upsample,
    ("torch.nn.modules.linear", "Identity"): nn.Identity,
}
for _mod, _names in {"dall_e.encoder": ("Encoder", "EncoderBlock"),
                     "dall_e.decoder": ("Decoder", "DecoderBlock"),
                     "dall_e.utils": ("Conv2d",)}.items():
    for _n in _names:
        _ALLOWED[(_mod, _n)] = type(_n, (_Stub,), {"__module__": "cimfast.tokenizer._stubs"})


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load {module}.{name}: the file is not a DALL-E tokenizer "
                           "(it names a class or function a tokenizer file never holds)") from None


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: a restricted Unpickler."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "cimfast_restricted_pickle"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_official_pickle(path: str, expected_sha256: str | None = None) -> dict:
    """State dict of an official-format ``encoder.pkl``/``decoder.pkl``, loaded safely."""
    if not os.path.isfile(path):
        raise TokenizerFileError(f"tokenizer file {path} does not exist")
    check_pin(path, sha256_of(path), expected_sha256)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except _Refused as e:
        raise TokenizerFileError(f"{path}: {e}") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise TokenizerFileError(f"{path} could not be read as a DALL-E tokenizer ({type(e).__name__}: {e})") from None
    if not isinstance(obj, nn.Module):
        raise TokenizerFileError(f"{path} holds a {type(obj).__name__}, not a tokenizer module")
    return {k: v.detach().float().contiguous() for k, v in obj.state_dict().items()}


def check_pin(path: str, digest: str | None, pinned: str | None) -> None:
    if pinned is None:
        return
    if digest is None:
        raise TokenizerFileError(f"cannot check the pinned SHA-256 of {path}: the file records none "
                                 "(pin the pickles it was converted from, or unset the pin)")
    if digest != pinned.lower():
        raise TokenizerFileError(f"SHA-256 of {path} is {digest}, pinned {pinned}: the file is damaged, "
                                 "changed or not the one pinned")


def save_safetensors(tok: Tokenizer, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"encoder.{k}": v.contiguous() for k, v in tok.encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v.contiguous() for k, v in tok.decoder.state_dict().items()})
    meta = {k: str(v) for k, v in asdict(tok.spec).items()}
    meta.update(metadata or {})
    umask = os.umask(0)
    os.umask(umask)
    # ranks may write at once; a tokenizer is meant to be shared (temporary files are private)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o666 & ~umask)


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise TokenizerFileError(f"{path} could not be read as a tokenizer ({type(e).__name__}: {e})") from None


def tokenizer_from_state_dict(sd: dict, source: str = "the state dict") -> Tokenizer:
    """A Tokenizer from ``encoder.*``/``decoder.*`` weights (its sizes read from their shapes)."""
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    return _build(enc, dec, source, source)


def _looks_like(sd: dict) -> str:
    """'encoder', 'decoder' or '?' from the first convolution's input channels."""
    w = sd.get("blocks.input.w")
    if w is None or w.dim() != 4:
        return "?"
    return "encoder" if w.shape[1] == 3 else "decoder"


def _build(enc: dict, dec: dict, enc_src: str, dec_src: str) -> Tokenizer:
    if _looks_like(enc) == "decoder" and _looks_like(dec) == "encoder":
        raise TokenizerFileError(f"{enc_src} holds a decoder and {dec_src} an encoder: the two files are swapped")
    for sd, src, part in ((enc, enc_src, "encoder"), (dec, dec_src, "decoder")):
        if _looks_like(sd) != part:
            raise TokenizerFileError(f"{src} does not hold a DALL-E {part} (no {part} input convolution)")
    try:
        tok = Tokenizer(spec_from_state_dicts(enc, dec))
        tok.encoder.load_state_dict(enc, strict=True)
        tok.decoder.load_state_dict(dec, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise TokenizerFileError(f"{enc_src} / {dec_src} do not match the DALL-E architecture ({first})") from None
    return tok


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _digest(path: str, meta: dict, key: str) -> str:
    """SHA-256 of a pickle: the one the cache recorded when size and mtime are unchanged, else computed."""
    if meta.get(f"{key}_stamp") == _stamp(path) and meta.get(f"{key}_sha256"):
        return meta[f"{key}_sha256"]
    return sha256_of(path)


def load_tokenizer(path: str, encoder_sha256: str | None = None,
                   decoder_sha256: str | None = None) -> Tokenizer:
    """Load a tokenizer from a ``.safetensors`` file or a folder.

    A folder holds the official ``encoder.pkl`` + ``decoder.pkl`` (read with
    the restricted unpickler and converted once to ``tokenizer.safetensors``
    beside them, which records their SHA-256, size and mtime) or only a
    ``tokenizer.safetensors``. The cache is used only while it matches the
    pickles beside it: a pickle whose size or mtime changed is hashed again,
    and a changed SHA-256 makes the pickles be read again and the cache
    re-derived (a damaged cache too). Pinned SHA-256 values are always
    checked: against the pickles' (recorded while their size and mtime are
    unchanged, else computed), or against the values a ``.safetensors``
    records of the pickles it was converted from.
    """
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise TokenizerFileError(f"tokenizer file {path} does not exist")
        sd, meta = _read_safetensors(path)
        check_pin(path, meta.get("encoder_sha256"), encoder_sha256)
        check_pin(path, meta.get("decoder_sha256"), decoder_sha256)
        return tokenizer_from_state_dict(sd, path)
    if not os.path.isdir(path):
        raise TokenizerFileError(f"tokenizer path {path} is neither a folder nor a .safetensors file")
    cached = os.path.join(path, "tokenizer.safetensors")
    enc_p, dec_p = os.path.join(path, "encoder.pkl"), os.path.join(path, "decoder.pkl")
    have_pkl = os.path.isfile(enc_p) and os.path.isfile(dec_p)
    if not have_pkl:
        if os.path.isfile(cached):
            return load_tokenizer(cached, encoder_sha256, decoder_sha256)
        missing = [p for p in (enc_p, dec_p) if not os.path.isfile(p)]
        raise TokenizerFileError(f"tokenizer files missing: {', '.join(missing)}")
    try:
        sd, meta = _read_safetensors(cached) if os.path.isfile(cached) else ({}, {})
    except TokenizerFileError:  # a damaged cache: made again from the pickles
        sd, meta = {}, {}
    digests = {"encoder": _digest(enc_p, meta, "encoder"), "decoder": _digest(dec_p, meta, "decoder")}
    check_pin(enc_p, digests["encoder"], encoder_sha256)
    check_pin(dec_p, digests["decoder"], decoder_sha256)
    if sd and all(meta.get(f"{k}_sha256") == d for k, d in digests.items()):
        return tokenizer_from_state_dict(sd, cached)
    tok = _build(load_official_pickle(enc_p), load_official_pickle(dec_p), enc_p, dec_p)
    try:
        save_safetensors(tok, cached, {"encoder_sha256": digests["encoder"], "decoder_sha256": digests["decoder"],
                                       "encoder_stamp": _stamp(enc_p), "decoder_stamp": _stamp(dec_p)})
    except OSError:
        pass
    return tok
