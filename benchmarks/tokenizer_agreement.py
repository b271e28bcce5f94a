"""Token agreement of the tokenizer's bf16 fast path with fp32.

    python benchmarks/tokenizer_agreement.py                  # shipped tiny tokenizer + DALL-E architecture
    python benchmarks/tokenizer_agreement.py --tokenizer_path tokenizers/dalle --images 64

The fast path runs the residual groups in bf16 and keeps the input and output
convolutions in fp32 (``Tokenizer.fast``). For each tokenizer this reports,
on crops of the demo photographs at the tokenizer's resolution, the share of
token ids equal to fp32's and, for every disagreement, the fp32 gap between
the top two logits (a near-tie is a disagreement nobody can call wrong).
Without ``--tokenizer_path`` the DALL-E architecture gets seeded random
weights (the official files cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from cimfast.objective.cim import TINY_TOKENIZER
from cimfast.pipelines.datasets import DemoDataset
from cimfast.pipelines.views import as_unit
from cimfast.tokenizer.files import load_tokenizer
from cimfast.tokenizer.model import DALLE_SPEC, Tokenizer, map_pixels


@torch.no_grad()
def agreement(tok: Tokenizer, images: torch.Tensor, batch: int = 8) -> dict:
    fast = copy.deepcopy(tok).fast(torch.bfloat16, compile=False)
    same, total, gaps = 0, 0, []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        logits = tok.encoder(map_pixels(x)).float()  # fp32 reference
        ref = logits.argmax(1)
        got = fast.tokenize(x)
        top2 = logits.topk(2, dim=1).values
        gap = (top2[:, 0] - top2[:, 1])
        diff = got != ref
        same += int((~diff).sum())
        total += diff.numel()
        gaps += gap[diff].tolist()
    return {"tokens": total, "agreement": same / total, "disagreements": total - same,
            "max_gap_of_disagreements": max(gaps, default=0.0)}


def demo_crops(size: int, n: int) -> torch.Tensor:
    ds = DemoDataset(size, None, samples=n, split="heldout", seed=1)
    return as_unit(torch.stack([ds[(0, i)]["images"] for i in range(n)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer_path", default=None, help="official DALL-E files (default: random weights)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    tiny = load_tokenizer(TINY_TOKENIZER)
    results["tiny (shipped)"] = agreement(tiny, demo_crops(56, a.images * 4))
    dalle = load_tokenizer(a.tokenizer_path) if a.tokenizer_path else Tokenizer(DALLE_SPEC)
    name = "dalle (official files)" if a.tokenizer_path else "dalle architecture (random weights)"
    results[name] = agreement(dalle, demo_crops(112, a.images))
    for k, r in results.items():
        print(f"{k}: {r['agreement']:.2%} of {r['tokens']} tokens equal to fp32; "
              f"{r['disagreements']} disagreements, largest fp32 top-2 gap among them {r['max_gap_of_disagreements']:.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
