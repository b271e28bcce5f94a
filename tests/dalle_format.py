"""Writes tokenizer files in the official DALL-E format for the tests: a
``torch.save`` pickle of whole modules whose classes are ``dall_e.encoder.Encoder``
etc., with the attributes the official attrs classes carry."""
import sys
import types

import torch

from cimfast.tokenizer import model as T

_NAMES = {"dall_e.encoder": ("Encoder", "EncoderBlock"), "dall_e.decoder": ("Decoder", "DecoderBlock"),
          "dall_e.utils": ("Conv2d",)}


def _fake_classes():
    if "dall_e.utils" in sys.modules and hasattr(sys.modules["dall_e.utils"], "Conv2d"):
        return {n: getattr(sys.modules[m], n) for m, ns in _NAMES.items() for n in ns}
    pkg = types.ModuleType("dall_e")
    sys.modules["dall_e"] = pkg
    out = {}
    for mod_name, names in _NAMES.items():
        mod = types.ModuleType(mod_name)
        for n in names:
            cls = type(n, (getattr(T, n),), {"__module__": mod_name, "__qualname__": n})
            setattr(mod, n, cls)
            out[n] = cls
        sys.modules[mod_name] = mod
        setattr(pkg, mod_name.split(".")[1], mod)
    return out


def to_official(module: torch.nn.Module) -> torch.nn.Module:
    """Re-class a cimfast Encoder/Decoder in place as dall_e classes, with the
    official attrs fields, ready for torch.save."""
    classes = _fake_classes()
    for m in module.modules():
        name = type(m).__name__
        if name in classes:
            m.__class__ = classes[name]
        if name == "Conv2d":
            m.use_float16, m.device, m.requires_grad = True, torch.device("cpu"), False
    module.device, module.requires_grad, module.use_mixed_precision = torch.device("cpu"), False, True
    return module


def write_official(spec, folder, seed=0):
    """encoder.pkl and decoder.pkl of a random tokenizer; returns the source Tokenizer."""
    torch.manual_seed(seed)
    tok = T.Tokenizer(spec)
    ref_state = {k: v.clone() for k, v in tok.state_dict().items()}
    torch.save(to_official(tok.encoder), f"{folder}/encoder.pkl")
    torch.save(to_official(tok.decoder), f"{folder}/decoder.pkl")
    fresh = T.Tokenizer(spec)
    fresh.load_state_dict(ref_state)
    return fresh
