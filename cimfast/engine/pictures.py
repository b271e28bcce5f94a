"""The pictures that tell a person the method works."""
from __future__ import annotations

import re

import numpy as np
import torch


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _outline(canvas: np.ndarray, grid_mask: np.ndarray, patch: int, color) -> None:
    """Draw a 1-px box around every patch where ``grid_mask`` is set."""
    for i, j in zip(*np.nonzero(grid_mask)):
        t, l = i * patch, j * patch
        b, r = t + patch - 1, l + patch - 1
        canvas[t, l:r + 1] = color
        canvas[b, l:r + 1] = color
        canvas[t:b + 1, l] = color
        canvas[t:b + 1, r] = color


def save_grid(visuals: dict, patch: int, path: str, max_rows: int = 8) -> None:
    """Rows of original | corrupted (replaced patches outlined in red) |
    restored (ResPix) or detected-as-replaced patches outlined in yellow (RevDet)."""
    from PIL import Image

    n = min(max_rows, visuals["original"].shape[0])
    rows = []
    for k in range(n):
        orig = _to_uint8(visuals["original"][k])
        corr = _to_uint8(visuals["corrupted"][k])
        _outline(corr, visuals["replaced"][k].cpu().numpy() > 0, patch, (255, 0, 0))
        if "restored" in visuals:
            third = _to_uint8(visuals["restored"][k])
        else:
            third = _to_uint8(visuals["corrupted"][k])
            _outline(third, visuals["detected"][k].cpu().numpy() > 0, patch, (255, 255, 0))
        gap = np.full((orig.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([orig, gap, corr, gap, third], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(path)


def save_loss_plot(records: list[dict], path: str) -> dict:
    """``loss.png``: each loss, and RevDet's detection accuracy, beside its trivial
    baseline (dashed) where it has one, and the k-NN monitor beside its step-0 value
    (dotted). Returns {panel: [series drawn]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, [(k, "-"), (f"{k}_trivial", "--")]) for k in ("loss", "gen_loss", "enh_loss", "det_acc")
              if any(k in r for r in records)]  # RevDet's enh_loss has no baseline; its det_acc has one
    knn = sorted({k for r in records for k in r if re.fullmatch(r"knn_top1(_\w+)?", k)
                  and not k.endswith(("_init", "_gain"))})
    if knn:
        panels.append(("k-NN top-1 (%)", [s for k in knn for s in ((k, "o-"), (f"{k}_init", ":"))]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    drawn = {}
    for ax, (title, series) in zip(axes[0], panels):
        drawn[title] = []
        for key, style in series:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if style == "o-":  # the monitor's curve starts at its step-0 value
                pts = [(r["step"], r[f"{key}_init"]) for r in records if f"{key}_init" in r][:1] + pts
            if not pts:
                continue
            if style == ":":  # the step-0 value, across the run
                last = max((r["step"] for r in records), default=1)
                pts = [(0, pts[0][1]), (last, pts[0][1])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key)
            drawn[title].append(key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(drawn[title]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
