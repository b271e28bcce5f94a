"""Generator (small BEiT) and enhancers (ViT, ResNet)."""
