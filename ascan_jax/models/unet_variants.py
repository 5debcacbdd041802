"""AsCAN UNet variants (JAX-free, so configs can read them cheaply).
PLACEHOLDER
"""
from __future__ import annotations

VARIANTS = {
    "tiny": dict(channels=(32, 64, 64), down_layout="C-CT-CT", mid_layout="CTC",
                 head_dim=16, context_dim=32, norm_groups=8),
    "imagenet": dict(channels=(160, 320, 640), down_layout="CCC-CCTT-C" + "T" * 20,
                     mid_layout="CTC", head_dim=64, context_dim=768),
    "t2i": dict(channels=(320, 640, 1280), down_layout="CCT-CCTT-C" + "T" * 20,
                mid_layout="CTC", head_dim=64, context_dim=4096),
}
