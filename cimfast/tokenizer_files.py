"""Reading and writing tokenizer files.

The official DALL-E ``encoder.pkl`` / ``decoder.pkl`` are pickles of whole
Python modules: ``load_official_pickle`` reads them with a restricted
unpickler that rebuilds tensors and the known classes only (anything else is
refused before it can run), and the weights are copied into freshly built
modules of ``cimfast.tokenizer`` and cached as safetensors.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.nn as nn

from cimfast.tokenizer import Tokenizer, spec_from_state_dicts

OFFICIAL_HINT = (
    "Download the official DALL-E tokenizer files encoder.pkl and decoder.pkl "
    "(the links are in the README of the openai/DALL-E repository) and pass the "
    "folder that holds them with --tokenizer_path, or train your own with "
    "`python -m cimfast.tokenizer_train`."
)


# --------------------------------------------------------------------------
# Loading: official pickles (restricted), safetensors (ours)
# --------------------------------------------------------------------------
class NotATokenizerError(RuntimeError):
    pass


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


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise NotATokenizerError(
                f"refused to load {module}.{name}: the file is not a DALL-E tokenizer "
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
        raise FileNotFoundError(f"tokenizer file {path} does not exist. {OFFICIAL_HINT}")
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise NotATokenizerError(
            f"SHA-256 of {path} is {digest}, expected {expected_sha256}: the file is "
            f"damaged or not the one pinned. {OFFICIAL_HINT}")
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule,
                         weights_only=False)
    except NotATokenizerError as e:
        raise NotATokenizerError(f"{path}: {e}") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise NotATokenizerError(
            f"{path} could not be read as a DALL-E tokenizer ({type(e).__name__}: {e}). "
            f"{OFFICIAL_HINT}") from None
    if not isinstance(obj, nn.Module):
        raise NotATokenizerError(f"{path} holds a {type(obj).__name__}, not a tokenizer module. {OFFICIAL_HINT}")
    return {k: v.detach().float().contiguous() for k, v in obj.state_dict().items()}


def save_safetensors(tok: Tokenizer, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"encoder.{k}": v.contiguous() for k, v in tok.encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v.contiguous() for k, v in tok.decoder.state_dict().items()})
    meta = {k: str(v) for k, v in asdict(tok.spec).items()}
    meta.update(metadata or {})
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a tokenizer is meant to be shared
    os.replace(tmp, path)


def load_safetensors(path: str) -> Tokenizer:
    from safetensors.torch import load_file

    return tokenizer_from_state_dict(load_file(path))


def tokenizer_from_state_dict(sd: dict) -> Tokenizer:
    """A Tokenizer from ``encoder.*``/``decoder.*`` weights (its sizes read from their shapes)."""
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    return _build(enc, dec)


def _build(enc: dict, dec: dict) -> Tokenizer:
    tok = Tokenizer(spec_from_state_dicts(enc, dec))
    tok.encoder.load_state_dict(enc, strict=True)
    tok.decoder.load_state_dict(dec, strict=True)
    return tok


def load_tokenizer(path: str, encoder_sha256: str | None = None,
                   decoder_sha256: str | None = None) -> Tokenizer:
    """Load a tokenizer from a ``.safetensors`` file or a folder.

    A folder holds either ``tokenizer.safetensors`` or the official
    ``encoder.pkl`` + ``decoder.pkl``; the pickles are read once with the
    restricted unpickler and converted to ``tokenizer.safetensors`` beside them
    (or, if the folder is read-only, nowhere: they are then read every time).
    """
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist. {OFFICIAL_HINT}")
        return load_safetensors(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path} is neither a folder nor a .safetensors file. {OFFICIAL_HINT}")
    cached = os.path.join(path, "tokenizer.safetensors")
    enc_p, dec_p = os.path.join(path, "encoder.pkl"), os.path.join(path, "decoder.pkl")
    have_pkl = os.path.isfile(enc_p) and os.path.isfile(dec_p)
    if os.path.isfile(cached) and not (have_pkl and (encoder_sha256 or decoder_sha256)):
        return load_safetensors(cached)
    if not have_pkl:
        missing = [p for p in (enc_p, dec_p) if not os.path.isfile(p)]
        raise FileNotFoundError(f"tokenizer files missing: {', '.join(missing)}. {OFFICIAL_HINT}")
    enc = load_official_pickle(enc_p, encoder_sha256)
    dec = load_official_pickle(dec_p, decoder_sha256)
    tok = _build(enc, dec)
    try:
        save_safetensors(tok, cached, {"encoder_sha256": sha256_of(enc_p), "decoder_sha256": sha256_of(dec_p)})
    except OSError:
        pass
    return tok
