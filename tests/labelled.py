"""Small labelled image folders for the evaluation tests (one subfolder per class)."""
import os

import numpy as np
from PIL import Image


def make_labelled(root, classes=3, per_class=12, size=40, seed=0, noise=40, contrast=1.0):
    """Class c: noisy images whose mean colour is the c-th of a few distinct colours
    (``contrast`` < 1 moves the colours towards grey: a harder task)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[:classes]
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            a = np.clip(128 + contrast * (colours[c] - 128) + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(os.path.join(root, f"class_{c}", f"{i:03d}.png"))
    return str(root)
