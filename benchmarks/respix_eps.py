"""Evidence for the ResPix variance floor ``window_eps``.

    python benchmarks/respix_eps.py                 # demo photos, 224 px views, window 9

The target is (x - window mean) / sqrt(window variance + eps) on pixels in
[0, 1]. The enhancer is trained to predict it from the corrupted image, so a
target made of 8-bit rounding noise is a target nothing can learn. For each
eps this measures, on random 224 px crops of the demo photographs:

* ``flat``: the share of pixels whose 9 x 9 window std is below 2/255;
* ``noise_rms``: the RMS difference between the target of the 8-bit view and
  the target of the same view before rounding to 8 bits (the part of the
  target that is quantization noise), overall and in flat windows;
* ``target_rms``: the RMS of the target itself, overall and in flat windows.

A good floor keeps ``noise_rms`` small against ``target_rms`` while leaving
the target of textured windows (std well above the floor) unchanged.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from cimfast.kernels.pixel_loss import window_normalize
from cimfast.pipelines.demo import demo_images
from cimfast.pipelines.views import sample_crop

EPS = (1e-6, 1e-5, 1e-4, 1e-3)


def views(size: int, crops: int, seed: int = 0):
    """(float view before rounding, the same view rounded to 8 bits), [N, 3, size, size] in [0, 1]."""
    imgs = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in demo_images("train") + demo_images("heldout")]
    exact = []
    for i in range(crops):
        img = imgs[i % len(imgs)]
        top, left, h, w, flip = sample_crop(seed, 0, i, img.shape[1], img.shape[2])
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        v = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0] / 255
        exact.append(v.clamp(0, 1).flip(-1) if flip else v.clamp(0, 1))
    exact = torch.stack(exact)
    return exact, (exact * 255).round() / 255


def measure(size: int = 224, crops: int = 64, window: int = 9) -> dict:
    exact, rounded = views(size, crops)
    _, _, std = window_normalize(rounded, window, eps=0.0)
    flat = std < 2 / 255
    out = {"size": size, "crops": crops, "window": window, "flat_fraction": float(flat.float().mean()),
           "median_window_std_255": float(std.median() * 255), "eps": {}}
    for eps in EPS:
        t_q, _, _ = window_normalize(rounded, window, eps)
        t_x, _, _ = window_normalize(exact, window, eps)
        noise = (t_q - t_x).square()
        out["eps"][str(eps)] = {
            "std_floor_255": math.sqrt(eps) * 255,
            "noise_rms": float(noise.mean().sqrt()), "noise_rms_flat": float(noise[flat].mean().sqrt()),
            "target_rms": float(t_q.square().mean().sqrt()), "target_rms_flat": float(t_q[flat].square().mean().sqrt()),
            "target_rms_textured": float(t_q[~flat].square().mean().sqrt()),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crops", type=int, default=64)
    p.add_argument("--window", type=int, default=9)
    a = p.parse_args(argv)
    r = measure(a.size, a.crops, a.window)
    print(f"{a.crops} crops at {a.size} px, window {a.window}: {r['flat_fraction']:.0%} of pixels have a window std "
          f"below 2/255 (median std {r['median_window_std_255']:.1f}/255)")
    print("eps      std floor  noise rms (all / flat)  target rms (all / flat / textured)")
    for eps, e in r["eps"].items():
        print(f"{float(eps):<8g} {e['std_floor_255']:6.2f}/255  {e['noise_rms']:.3f} / {e['noise_rms_flat']:.3f}"
              f"          {e['target_rms']:.3f} / {e['target_rms_flat']:.3f} / {e['target_rms_textured']:.3f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
