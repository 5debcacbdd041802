"""AsCAN-T/B/L hyper-parameters: our reconstruction of the paper's (non-public) Table 6.

Kept free of JAX so that config files can read it cheaply. Choices, with the reasoning:
* AsCAN-T: stage 1 is one C block; stages 2-4 are CCCT / CCTT / CTTT (the paper's "C1" layout,
  section 3.1); widths 64-128-256-512 and stem 64 as MaxViT-T; attention head dim 32 as MaxViT.
* AsCAN-B and AsCAN-L scale T the way MaxViT scales T to B and L: the third stage gets deeper
  (4 -> 16 blocks, still half C and half T) and the widths grow 1.5x (B) and 2x (L); every stage
  keeps its C/T ratio (75/25, 50/50, 25/75). AsCAN-L's last stage is 1120 wide (35 heads) and its
  stem 80 so that it lands on the paper's 173M parameters and 30.7 GMACs at 224x224.
* Stochastic depth 0.3 / 0.4 / 0.5 (paper appendix A.2). Head embedding 1280 (EfficientNetV2's).
The measured parameter and MAC counts are in the README's variant table.
"""
from __future__ import annotations

VARIANTS = {
    "T": dict(layout="C-CCCT-CCTT-CTTT", widths=(64, 128, 256, 512), stem_width=64,
              embed_dim=1280, head_dim=32, drop_path_rate=0.3),
    "B": dict(layout="C-CCCT-CCCCCCCCTTTTTTTT-CTTT", widths=(96, 192, 384, 768), stem_width=64,
              embed_dim=1280, head_dim=32, drop_path_rate=0.4),
    "L": dict(layout="C-CCCT-CCCCCCCCTTTTTTTT-CTTT", widths=(128, 256, 512, 1120),
              stem_width=80, embed_dim=1280, head_dim=32, drop_path_rate=0.5),
}
