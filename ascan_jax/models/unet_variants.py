"""AsCAN UNet variants: keyword arguments of ``unet.AsCANUNet`` (JAX-free, cheap to import).

Facts (arXiv 2411.04967 sec. 4.2, A.6, A.7): the class-conditional ImageNet model has Down
channels {160, 320, 640}, cross-attention width 768 and about 400M parameters; the T2I model has
{320, 640, 1280}, 5 / 10 / 20 heads (head dim 64) and a 4096-wide (Flan-T5-XXL) context.
Block counts are our choices (the paper's Fig. 2 is an image); the reasons are in
``unet.py``'s docstring. In short:

* ``imagenet``: Down ``CCC-CCTT-C`` + 20 ``T`` (level 1: C only, 160 channels do not split
  into 64-wide heads; level 2: half C, half T; level 3: one C then a deep T stack, as SDXL puts
  its depth at the lowest resolution), Middle ``CTC``, Up = Down per level. The depth of
  level 3 is what sets the size: each extra T block there adds 2 x 6.7M parameters (Down and
  Up), and 20 gives 393.5M, within 2% of the paper's "about 400M" (18 would give 366.6M).
  Measured on a 32x32x4 latent (SD-VAE latent of a 256px image), batch 1, xla attention, one
  class token: 32.8 GMACs (15.9 conv + 17.0 dot); 135.7 GMACs at 64x64 (512px).
* ``t2i``: the same counts at twice the width, except one T block at level 1 (the paper gives 5
  heads at the first Down level, so that level has attention): Down ``CCT-CCTT-C`` + 20 ``T``.
  1.85B parameters; 162 GMACs at 32x32 with 77 context tokens.
* ``tiny``: channels (32, 64, 64), ``C-CT-CT`` / ``CTC``, head dim 16, 32-wide context, 8 norm
  groups; 1.8M parameters, for CPU tests and demos.
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
