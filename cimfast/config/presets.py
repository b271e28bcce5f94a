"""Named model presets. Every value here is a default a user can override.

Where the CIM paper's text does not fix a value it is a setting; the default
and where it comes from:

* generator size: the paper says "a small trainable BEiT"; we use 4 layers
  (ELECTRA's finding that a generator of 1/4 to 1/2 the discriminator's size
  trains the discriminator best) at half the enhancer width (1/4 of its FLOPs
  per layer), 4 layers for ViT-B, 6 for ViT-L.
* masked patches: BEiT's 75 of 196 (38 %) with blocks of at least 16 patches.
* ResPix window: 9 x 9 (odd so the window is centred on its pixel).
* enhancer loss weight: 1.0 (``Config.enhancer_weight``).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # CPU demo and tests: 112 px images, 7 x 7 patches, the tiny tokenizer (512 codes).
    "tiny": dict(enhancer="vit", img_size=112, enhancer_dim=192, enhancer_depth=4, enhancer_heads=3,
                 generator_dim=96, generator_depth=2, generator_heads=3, tokenizer="tiny",
                 num_masked=20, min_block=4),
    "tiny-resnet": dict(enhancer="resnet", img_size=112, resnet_layers=(1, 1, 1, 1), resnet_width=16,
                        generator_dim=96, generator_depth=2, generator_heads=3, tokenizer="tiny",
                        num_masked=20, min_block=4),
    "small": dict(enhancer="vit", img_size=224, enhancer_dim=384, enhancer_depth=12, enhancer_heads=6,
                  generator_dim=192, generator_depth=4, generator_heads=3, tokenizer="dalle",
                  num_masked=75, min_block=16),
    "base": dict(enhancer="vit", img_size=224, enhancer_dim=768, enhancer_depth=12, enhancer_heads=12,
                 generator_dim=384, generator_depth=4, generator_heads=6, tokenizer="dalle",
                 num_masked=75, min_block=16),
    "large": dict(enhancer="vit", img_size=224, enhancer_dim=1024, enhancer_depth=24, enhancer_heads=16,
                  generator_dim=512, generator_depth=6, generator_heads=8, tokenizer="dalle",
                  num_masked=75, min_block=16),
    "resnet50": dict(enhancer="resnet", img_size=224, resnet_layers=(3, 4, 6, 3), resnet_width=64,
                     generator_dim=384, generator_depth=4, generator_heads=6, tokenizer="dalle",
                     num_masked=75, min_block=16),
}
