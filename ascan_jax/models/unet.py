"""The AsCAN UNet: an epsilon-prediction network built from the classifier's C and T blocks.

Facts (arXiv 2411.04967 sec. 3.3.1, 4.2, A.6, A.7): three Down levels, a Middle and three Up
levels that mirror Down; skip connections *add* Down features into the Up path; a sinusoidal
timestep embedding through two linear layers, added inside C blocks; conditioning by
cross-attention computed in parallel with self-attention inside T blocks (queries from image
tokens, keys/values from the context); 2-D RoPE and query/key RMSNorm in the T blocks; more C
blocks at high resolution and more T blocks at low resolution. Everything below that the paper
does not give (its Fig. 2 is an image) is a choice, with the reason:

* **Level layouts** are per-level block strings parsed by ``models.layout`` (``"CCC-CCTT-C..T"``).
  The variants (``unet_variants``) put no T block at the first ImageNet level: 160 channels do
  not split into 64-wide heads, and 1024 (32x32) to 4096 (64x64) tokens make attention the
  most expensive op there; SDXL also has no attention at its highest resolution. The T2I
  variant has one T block at level 1 because the paper lists heads for all three Down levels.
  Depth goes to the lowest resolution, as in SDXL (whose lowest level holds most transformer
  layers) and the AsCAN classifier's last stage.
* **Mid block** ``"CTC"``: the SD/SDXL middle (ResBlock, attention, ResBlock) with AsCAN blocks.
* **Up path**: each Up level has the *same* block string as its Down level (not one more block
  as in SD: SD's extra block exists to consume the concatenated skip of its downsampler; with
  additive skips there is one skip per Down block and an exact mirror consumes each exactly
  once). A different ``up_layout`` may be given; its level ``l`` needs at least as many blocks
  as Down level ``l`` has (extra blocks get no skip).
* **Skips**: the output of every Down block is kept; before Up block ``i`` of a level the skip of
  the mirrored Down block (last in, first out) is added, ``x = x + skip``. Addition needs equal
  widths, so a level keeps one width throughout and the resampling ops change width.
* **Down-sampling**: a 3x3 stride-2 convolution ``w_{l-1} -> w_l`` at the start of levels 2..3
  (SD's ``Downsample2D``, widened). **Up-sampling**: nearest-neighbour x2 then a 3x3
  convolution ``w_{l+1} -> w_l`` (SD's ``Upsample2D``), at the start of Up levels 2..1.
* **Stem / head**: a 3x3 convolution ``in_channels -> w_1``; GroupNorm, SiLU and a 3x3
  convolution to ``out_channels`` whose kernel and bias are **zero-initialised**, so the network
  predicts eps = 0 at initialisation (common for diffusion: SD's zero modules, DiT's zeroed final
  layer), and the loss starts at E[eps^2] = 1 with every block's gradient still flowing.
* **Normalisation**: C blocks use GroupNorm (``norm_groups``), not BatchNorm, see
  ``blocks.ConvBlock``. T blocks keep LayerNorm.
* **Timestep embedding**: sinusoids of width ``w_1``, Dense(``4 w_1``), SiLU, Dense(``4 w_1``)
  (SD's widths); each C block adds SiLU + Dense of it after its expansion conv and norm.
* **Cross-attention** is in every T block and has the T block's heads; the context's width is
  ``context_dim`` (768 class-conditional, 4096 T5-XXL). ``context_dim=None`` builds an
  unconditional UNet (no cross-attention). The UNet never learns what the context holds.
* **Position**: 2-D RoPE with integer token coordinates at every resolution (``models.rope``), so
  the same weights run at 32x32 and 64x64 latents; H and W must be divisible by 2**(levels-1).

Call: ``eps = model.apply(variables, x_t, t, context, context_mask, train=...)`` with
``x_t`` ``[B, H, W, in_channels]`` (NHWC), ``t`` ``[B]`` float timesteps in ``[0, 1000)``,
``context`` ``[B, L, context_dim]`` and ``context_mask`` ``[B, L]`` (True = real token) or None;
compute in ``dtype``, output float32 ``[B, H, W, out_channels]``. There are no BatchNorm
statistics: ``variables`` holds only ``params``. ``train=True`` only enables drop-path (needs a
``dropout`` rng when ``drop_path_rate > 0``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import blocks
from ascan_jax.models import conditioning
from ascan_jax.models import layout as layout_lib
from ascan_jax.models import remat as remat_lib
from ascan_jax.models import unet_variants

VARIANTS = unet_variants.VARIANTS


class Downsample(nn.Module):
  """3x3 stride-2 convolution to ``features`` channels."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return blocks.conv(self.features, 3, 2, dtype=self.dtype, name="conv", use_bias=True)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 up-sampling, then a 3x3 convolution to ``features`` channels."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return blocks.conv(self.features, 3, 1, dtype=self.dtype, name="conv", use_bias=True)(x)


class AsCANUNet(nn.Module):
  """Class- or text-conditional AsCAN UNet; ``__call__(x, t, context, context_mask, train)``."""
  channels: Sequence[int] = (160, 320, 640)
  down_layout: str = "CCC-CCTT-CTTT"
  mid_layout: str = "CTC"
  up_layout: str | None = None
  in_channels: int = 4
  out_channels: int = 4
  head_dim: int = 64
  context_dim: int | None = 768
  time_embed_dim: int | None = None  # None: 4 * channels[0] (SD).
  mlp_ratio: int = 4
  expand_ratio: int = 4
  se_ratio: float = 0.25
  norm_groups: int = 32
  qk_norm: bool = True
  position: str = "rope"
  drop_path_rate: float = 0.0
  attention_impl: str = "auto"
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  def levels(self) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(down level strings, up level strings, mid string), validated."""
    n = len(self.channels)
    down = layout_lib.parse_layout(self.down_layout, num_stages=n)
    up = down if self.up_layout is None else layout_lib.parse_layout(self.up_layout, n)
    (mid,) = layout_lib.parse_layout(self.mid_layout, num_stages=1)
    for level, (d, u) in enumerate(zip(down, up)):
      if len(u) < len(d):
        raise ValueError(f"up level {level + 1} ({u!r}) has fewer blocks than down level "
                         f"{level + 1} ({d!r}): every down block's skip needs an up block")
    return down, up, mid

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channels) - 1)

  def _check_inputs(self, x, context, context_mask):
    if self.position not in ("rope", "none"):
      raise ValueError(f"UNet position encoding must be 'rope' or 'none', got {self.position!r} "
                       "(a relative-bias table is sized for one grid; the UNet runs at many)")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be NHWC with {self.in_channels} channels, got {x.shape}")
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"height and width must be divisible by {f}, got {x.shape[1:3]}")
    if self.context_dim is None:
      if context is not None:
        raise ValueError("this UNet is unconditional (context_dim=None); got a context")
      return
    if context is None or context.ndim != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(f"context must be [batch={x.shape[0]}, tokens, {self.context_dim}], "
                       f"got {None if context is None else context.shape}")
    if context.shape[-1] != self.context_dim:
      raise ValueError(f"context width {context.shape[-1]} != context_dim {self.context_dim}")
    if context_mask is not None and context_mask.shape != context.shape[:2]:
      raise ValueError(f"context_mask must be {context.shape[:2]}, got {context_mask.shape}")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    self._check_inputs(x, context, context_mask)
    down, up, mid = self.levels()
    widths = tuple(self.channels)
    total = sum(map(len, down)) + len(mid) + sum(map(len, up))
    rates = iter([self.drop_path_rate * i / max(1, total - 1) for i in range(total)])

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    emb_width = self.time_embed_dim or 4 * widths[0]
    emb = conditioning.TimestepEmbedding(emb_width, widths[0], self.dtype, name="time_embed")(t)
    if context is not None:
      context = nn.with_logical_constraint(context.astype(self.dtype),
                                           ("batch", "length", "embed"))

    conv_block = remat_lib.maybe_remat(blocks.ConvBlock, self.remat_policy)
    attn_block = remat_lib.maybe_remat(blocks.TransformerBlock, self.remat_policy)

    def block(kind: str, width: int, h, name: str):
      rate = next(rates)
      if kind == "C":
        return conv_block(width, expand_ratio=self.expand_ratio, se_ratio=self.se_ratio,
                          drop_path=rate, dtype=self.dtype, norm="group",
                          norm_groups=self.norm_groups, name=name)(h, train, emb)
      if width % self.head_dim:
        raise ValueError(f"{name}: width {width} is not a multiple of head_dim {self.head_dim}")
      return attn_block(width // self.head_dim, self.head_dim, h.shape[1:3], self.mlp_ratio,
                        drop_path=rate, attention_impl=self.attention_impl, dtype=self.dtype,
                        position=self.position, qk_norm=self.qk_norm,
                        cross_attention=self.context_dim is not None,
                        name=name)(h, train, context, context_mask)

    h = blocks.conv(widths[0], 3, dtype=self.dtype, name="conv_in", use_bias=True)(
        x.astype(self.dtype))
    skips = []
    for level, (stage, width) in enumerate(zip(down, widths)):
      if level > 0:
        h = blocks.constrain(Downsample(width, self.dtype, name=f"down{level + 1}_downsample")(h))
      level_skips = []
      for i, kind in enumerate(stage):
        h = block(kind, width, h, f"down{level + 1}_block{i + 1}_{kind}")
        level_skips.append(h)
      skips.append(level_skips)

    for i, kind in enumerate(mid):
      h = block(kind, widths[-1], h, f"mid_block{i + 1}_{kind}")

    for level in reversed(range(len(widths))):
      width = widths[level]
      if level < len(widths) - 1:
        h = blocks.constrain(Upsample(width, self.dtype, name=f"up{level + 1}_upsample")(h))
      level_skips = skips[level]
      for i, kind in enumerate(up[level]):
        if level_skips:
          h = h + level_skips.pop()
        h = block(kind, width, h, f"up{level + 1}_block{i + 1}_{kind}")

    h = nn.silu(blocks.group_norm(self.norm_groups, self.dtype, "norm_out")(h))
    out = nn.Conv(self.out_channels, (3, 3), padding="SAME", dtype=self.dtype,
                  param_dtype=jnp.float32, name="conv_out",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (None, None, "conv_in", "conv_out")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(h)
    return out.astype(jnp.float32)


def from_variant(name: str, **overrides) -> AsCANUNet:
  """``AsCANUNet`` with the hyper-parameters of ``unet_variants.VARIANTS[name]``, overridden."""
  if name not in VARIANTS:
    raise ValueError(f"unknown UNet variant {name!r}; known: {sorted(VARIANTS)}")
  kw = dict(VARIANTS[name])
  kw.update(overrides)
  return AsCANUNet(**kw)
