"""The tokenizer's rewritten forms beside the official form, in one run:
time and FLOPs of decode and encode, and the ratio.

    python benchmarks/bench_tokenizer_forms.py                    # DALL-E architecture, batch 4, 112 px
    python benchmarks/bench_tokenizer_forms.py --spec tiny --batch 16
    python benchmarks/bench_tokenizer_forms.py --switches --batch 128 --compile   # the GPU check's

``--switches`` times the training step's tokenizer work (tokenize the 112
px view, decode the corrupted ids) on the bf16 fast path with each setting
that trades exactness or start-up time for speed turned on alone, beside
the fast path without it, and measures each one's token agreement with
fp32: ``cudnn_benchmark``, ``tokenizer_fuse`` (with ``--compile``),
``tokenizer_io_bf16`` and ``tokenizer_fp8_logits``. They stay off by default
until such a measurement on a GPU says otherwise.

Random weights of the architecture (the cost does not depend on them).
Each form runs ``--repeats`` times, the two alternating, after one warm-up
call each; the median is reported. Prints a table and, with ``--out``, JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cimfast.tokenizer.model import DALLE_SPEC, TINY_SPEC, Tokenizer, map_pixels

SPECS = {"dalle": DALLE_SPEC, "tiny": TINY_SPEC}


def forms(tok: Tokenizer, batch: int, size: int, device) -> dict:
    """{part: {form: callable}} on inputs made once."""
    g = torch.Generator().manual_seed(0)
    x = map_pixels(torch.rand(batch, 3, size, size, generator=g)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    ids = torch.randint(0, tok.vocab_size, (batch, size // 8, size // 8), generator=g).to(device)
    emb = F.embedding(ids, tok.decoder.input_table())
    return {"decode": {"official": lambda: tok.decoder.forward_embedded(emb, official=True),
                       "rewritten": lambda: tok.decoder.forward_embedded(emb, 3)},
            "encode": {"official": lambda: tok.encoder.forward_official(x),
                       "rewritten": lambda: tok.encoder(x)}}


def gflop_per_image(fn, batch: int) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / batch / 1e9


def time_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


SWITCHES = {"fast path": {}, "cudnn_benchmark": {}, "tokenizer_fuse": {"fuse": True},
            "tokenizer_io_bf16": {"io_dtype": True}, "tokenizer_fp8_logits": {"fp8_logits": True}}


def switches(spec, batch: int, size: int, repeats: int, compile_: bool, device) -> list[dict]:
    """Tokenize + decode time and token agreement with fp32, per switch, in one run."""
    import torch.backends.cudnn as cudnn

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    torch.manual_seed(0)
    ref = Tokenizer(spec).to(device)
    with torch.no_grad():
        ref_ids = ref.tokenize(x)
    state = ref.state_dict()
    rows = []
    for name, kwargs in SWITCHES.items():
        if name == "tokenizer_fuse" and not compile_:
            continue
        tok = Tokenizer(spec).to(device)
        tok.load_state_dict(state)
        tok.fast(torch.bfloat16, compile=compile_, **kwargs)
        cudnn.benchmark = name == "cudnn_benchmark"
        with torch.no_grad():
            step = lambda: tok.decode(tok.tokenize(x))  # noqa: E731
            t0 = time.perf_counter()
            step()  # warm-up (compiles, autotunes)
            first_s = time.perf_counter() - t0
            ms = statistics.median(time_ms(step, device) for _ in range(repeats))
            agree = float((tok.tokenize(x) == ref_ids).float().mean())
        rows.append({"switch": name, "ms": ms, "img_per_s": batch / ms * 1e3, "first_call_s": first_s,
                     "token_agreement_vs_fp32": agree})
        cudnn.benchmark = False
    base = rows[0]["ms"]
    for r in rows:
        r["time_ratio_vs_fast_path"] = r["ms"] / base
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="dalle", choices=sorted(SPECS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=112, help="image side in pixels (a multiple of 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="decode,encode")
    p.add_argument("--bf16", action="store_true", help="the fast path's dtypes (Tokenizer.fast)")
    p.add_argument("--switches", action="store_true", help="time each speed switch beside the fast path")
    p.add_argument("--compile", action="store_true", help="with --switches: torch.compile the tokenizer")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.switches:
        rows = switches(SPECS[a.spec], a.batch, a.size, a.repeats, a.compile, device)
        print(f"tokenize + decode, tokenizer {a.spec}, batch {a.batch}, {a.size} px, {device}, bf16 fast path, "
              f"compile {a.compile}; random weights")
        print(f"{'switch':<22}{'ms':>9}{'img/s':>10}{'ratio':>8}{'first call s':>14}{'tokens = fp32':>15}")
        for r in rows:
            print(f"{r['switch']:<22}{r['ms']:>9.1f}{r['img_per_s']:>10.0f}{r['time_ratio_vs_fast_path']:>8.3f}"
                  f"{r['first_call_s']:>14.1f}{r['token_agreement_vs_fp32']:>15.2%}")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"spec": a.spec, "batch": a.batch, "device": str(device), "compile": a.compile,
                           "rows": rows}, f, indent=1)
        return 0
    torch.manual_seed(0)
    tok = Tokenizer(SPECS[a.spec]).to(device)
    if a.bf16:
        tok.fast(torch.bfloat16)
    parts = forms(tok, a.batch, a.size, device)
    rows = []
    with torch.no_grad():
        for part in a.parts.split(","):
            fns = parts[part]
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(a.repeats):
                for name, fn in fns.items():
                    times[name].append(time_ms(fn, device))
            res = {name: {"ms": statistics.median(ts), "gflop_per_image": gflop_per_image(fns[name], a.batch)}
                   for name, ts in times.items()}
            o, r = res["official"], res["rewritten"]
            rows.append({"part": part, **{f"{k}_{name}": v for name in res for k, v in res[name].items()},
                         "time_ratio": r["ms"] / o["ms"], "flop_ratio": r["gflop_per_image"] / o["gflop_per_image"]})
    print(f"tokenizer {a.spec}, batch {a.batch}, {a.size} px, {device}, {'bf16' if a.bf16 else 'fp32'}, "
          f"median of {a.repeats}")
    print(f"{'part':<8}{'official ms':>13}{'rewritten ms':>14}{'time ratio':>12}{'GFLOP/img':>18}{'FLOP ratio':>12}")
    for r in rows:
        print(f"{r['part']:<8}{r['ms_official']:>13.1f}{r['ms_rewritten']:>14.1f}{r['time_ratio']:>12.3f}"
              f"{r['gflop_per_image_official']:>9.1f} ->{r['gflop_per_image_rewritten']:>6.1f}{r['flop_ratio']:>12.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"spec": a.spec, "batch": a.batch, "size": a.size, "device": str(device), "bf16": a.bf16,
                       "repeats": a.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
