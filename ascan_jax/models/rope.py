"""2-D rotary position embedding (RoPE) and query/key RMSNorm for the UNet's T blocks.

AsCAN's text-to-image UNet uses RoPE in T-block attention (it reduces repeated-pattern artefacts
at resolutions other than the training one) and RMSNorm on queries and keys (stable bf16
training); arXiv 2411.04967 sec. 3.3.1 / A.6. The exact RoPE form is not given; this is the axial
2-D form (as in FiT, EVA-02, FLUX, "Rotary position embedding for ViT"):

* the head dimension ``D`` (a multiple of 4) is split into two halves; the first half is rotated
  by the token's row ``y``, the second by its column ``x``;
* inside a half of width ``D/2``, rotation pair ``i`` (``i < D/4``) turns by angle
  ``pos * base**(-i / (D/4))`` (the 1-D RoPE frequencies of a ``D/2``-wide vector);
* pairs are "rotate-half" pairs: element ``j`` of the first half of the head vector pairs with
  element ``j`` of the second half (``j < D/2``); pair ``j`` uses the row for ``j < D/4`` and
  the column otherwise.

Positions are integer token coordinates (0 .. H-1, 0 .. W-1) at every resolution: the rotation
makes ``q . k`` depend only on the position *difference*, so a larger latent simply has more
offsets, and no resizing is needed. ``base`` is 10000 (the usual choice).

Rotation is computed in float32 and cast back, so bf16 compute stays accurate.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BASE = 10000.0


def rope_2d_angles(height: int, width: int, head_dim: int,
                   base: float = DEFAULT_BASE) -> tuple[np.ndarray, np.ndarray]:
  """``(cos, sin)`` of the rotation angles, each float32 ``[height*width, head_dim // 2]``.

  Tokens are in row-major order (the order of ``x.reshape(b, h*w, c)`` on NHWC maps).
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
  quarter = head_dim // 4
  freqs = base ** (-np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  ys, xs = ys.reshape(-1, 1).astype(np.float64), xs.reshape(-1, 1).astype(np.float64)
  angles = np.concatenate([ys * freqs, xs * freqs], axis=-1)  # [N, D/2]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[batch, tokens, heads, head_dim]`` by per-token angles ``[tokens, D/2]``."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos = jnp.asarray(cos)[None, :, None, :]
  sin = jnp.asarray(sin)[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)


def apply_rope_2d(x: jax.Array, height: int, width: int,
                  base: float = DEFAULT_BASE) -> jax.Array:
  """2-D RoPE on ``[batch, height*width, heads, head_dim]`` tokens of an ``height x width`` map."""
  if x.shape[1] != height * width:
    raise ValueError(f"{x.shape[1]} tokens do not form a {height}x{width} grid")
  cos, sin = rope_2d_angles(height, width, x.shape[-1], base)
  return apply_rope(x, cos, sin)


def qk_rms_norm(dtype: Any, name: str) -> nn.RMSNorm:
  """RMSNorm over the head dimension with one learned scale per channel, shared by all heads.

  Applied to ``[batch, tokens, heads, head_dim]`` queries or keys (SD3 / FLUX style). Statistics
  are computed in float32 by flax.
  """
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("kv",)))
