"""One attention function for every T block, with interchangeable implementations.

``dot_product_attention(q, k, v, bias, implementation=...)`` takes ``q, k, v`` as
``[batch, tokens, heads, head_dim]`` and an optional additive ``bias`` broadcastable to
``[batch, heads, q_tokens, kv_tokens]`` (the relative position bias). Implementations:

* ``xla``    reference: einsum, softmax in float32; any backend.
* ``cudnn``  ``jax.nn.dot_product_attention(implementation='cudnn')``: the fused cuDNN kernel on
             NVIDIA GPUs (bf16/fp16 inputs only).
* ``pallas`` the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu``); the
             kernel computes ``softmax((q k + ab) * scale)``, so ``q`` is pre-scaled and the bias
             passed unscaled; tokens are padded to the kernel block size and the padded keys masked.
* ``auto``   the fastest available: ``cudnn`` on GPU for bf16/fp16, ``pallas`` on TPU for sequences
             of at least ``PALLAS_MIN_SEQ_LEN`` tokens, ``xla`` otherwise. The thresholds are rules
             of thumb (maxdiffusion uses the same kind of minimum length), not measured here.

Keys may be masked with ``key_mask`` (``[batch, kv_tokens]``, True = attend), e.g. the padding
of a text context; a query whose keys are all masked gets a zero output (no context). Only
``xla`` implements the mask and queries/keys of different lengths for every backend: ``cudnn``
falls back to ``xla`` when a mask is given, ``pallas`` when a mask is given or the key length
differs from the query length (cross-attention). The UNet's cross-attention has short contexts
(1 class token, 77-ish text tokens), where a fused kernel gains little.

Also here: the learned 2-D relative position bias of classification attention, and the two
attention modules, ``MultiHeadSelfAttention`` (position encoding ``relative_bias`` for the
classifier, ``rope`` 2-D rotary for the UNet, or ``none``; optional query/key RMSNorm) and
``MultiHeadCrossAttention`` (queries from image tokens, keys and values from a context).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import rope as rope_lib

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
POSITION_ENCODINGS = ("relative_bias", "rope", "none")
PALLAS_MIN_SEQ_LEN = 1024
PALLAS_BLOCK = 128
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def resolve_implementation(implementation: str, dtype: Any, seq_len: int, head_dim: int,
                           platform: str | None = None) -> str:
  """Turns ``auto`` into a concrete implementation; checks the others are usable."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  platform = platform or jax.default_backend()
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  cudnn_ok = platform == "gpu" and low_precision and head_dim % 8 == 0 and head_dim <= 128
  if implementation == "auto":
    if cudnn_ok:
      return "cudnn"
    if platform == "tpu" and seq_len >= PALLAS_MIN_SEQ_LEN:
      return "pallas"
    return "xla"
  if implementation == "cudnn" and not cudnn_ok:
    raise ValueError(
        f"attention implementation 'cudnn' needs an NVIDIA GPU, bf16/fp16 compute and a head "
        f"dim that is a multiple of 8 and at most 128; got platform={platform}, "
        f"dtype={jnp.dtype(dtype).name}, head_dim={head_dim}. Use 'auto' or 'xla'.")
  return implementation


def _xla_attention(q, k, v, bias, scale, key_mask=None):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if key_mask is not None:
    keep = key_mask.astype(bool)[:, None, None, :]
    logits = jnp.where(keep, logits, _MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  if key_mask is not None:  # queries with no valid key attend to nothing.
    weights = weights * jnp.any(keep, axis=-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def _cudnn_attention(q, k, v, bias, scale):
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")


def _pallas_attention(q, k, v, bias, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only kernel.
  b, n, h, d = q.shape
  pad = (-n) % PALLAS_BLOCK
  qt, kt, vt = (jnp.swapaxes(t, 1, 2) for t in (q * jnp.asarray(scale, q.dtype), k, v))
  ab = jnp.zeros((1, h, n, n), jnp.float32) if bias is None else bias.astype(jnp.float32)
  ab = jnp.broadcast_to(ab, (b, h, n, n))
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    qt, kt, vt = (jnp.pad(t, widths) for t in (qt, kt, vt))
    ab = jnp.pad(ab, ((0, 0), (0, 0), (0, pad), (0, pad)))
    key_is_pad = jnp.arange(n + pad) >= n
    ab = jnp.where(key_is_pad[None, None, None, :], _MASK_VALUE, ab)
  out = tpu_flash.flash_attention(qt, kt, vt, ab=ab, sm_scale=1.0)
  return jnp.swapaxes(out[:, :, :n], 1, 2)


def _mesh_axes_that_divide(names, shape, mesh):
  """Mesh axes of ``names`` (logical, via flax's active rules), dropping those that don't divide."""
  spec = nn.logical_to_mesh_axes(names)
  out = []
  for dim, axes in zip(shape, spec):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    out.append(axes if dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def _pallas_attention_sharded(q, k, v, bias, scale):
  """Runs the Pallas kernel per shard: custom kernels are not partitioned by GSPMD."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _pallas_attention(q, k, v, bias, scale)
  qspec = _mesh_axes_that_divide(("batch", None, "heads", None), q.shape, mesh)
  bspec = jax.sharding.PartitionSpec(None, qspec[2], None, None)
  fn = functools.partial(_pallas_attention, scale=scale)
  if bias is None:
    return jax.shard_map(lambda a, b_, c: fn(a, b_, c, None), mesh=mesh,
                         in_specs=(qspec,) * 3, out_specs=qspec, check_vma=False)(q, k, v)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qspec,) * 3 + (bspec,), out_specs=qspec,
                       check_vma=False)(q, k, v, bias)


_IMPLS = {"xla": _xla_attention, "cudnn": _cudnn_attention, "pallas": _pallas_attention_sharded}


def dot_product_attention(q, k, v, bias=None, *, key_mask=None, implementation: str = "auto",
                          scale: float | None = None):
  """Multi-head attention ``softmax(q k^T * scale + bias) v`` on ``[B, N, H, D]`` inputs.

  ``k`` and ``v`` may have another token count than ``q`` (cross-attention). ``key_mask``
  (``[B, kv_tokens]``, True = attend) masks keys; see the module docstring for which
  implementations fall back to ``xla`` then.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  impl = resolve_implementation(implementation, q.dtype, q.shape[1], q.shape[-1])
  if key_mask is not None:
    if key_mask.shape != (k.shape[0], k.shape[1]):
      raise ValueError(f"key_mask shape {key_mask.shape} is not [batch, kv_tokens] = "
                       f"{(k.shape[0], k.shape[1])}")
    impl = "xla"
  if impl == "pallas" and k.shape[1] != q.shape[1]:
    impl = "xla"
  if impl == "xla":
    return _xla_attention(q, k, v, bias, scale, key_mask)
  return _IMPLS[impl](q, k, v, bias, scale)


def relative_position_index(height: int, width: int) -> np.ndarray:
  """``[h*w, h*w, 2]`` offsets (dy, dx) shifted to be >= 0, as indices into a bias table."""
  coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
  coords = coords.reshape(-1, 2)
  rel = coords[:, None, :] - coords[None, :, :]
  rel += np.array([height - 1, width - 1])
  return rel


def resize_relative_position_table(table: jax.Array, height: int, width: int) -> jax.Array:
  """A ``[heads, 2h'-1, 2w'-1]`` table resized bilinearly to ``[heads, 2*height-1, 2*width-1]``.

  Half-pixel centres map the centre of the old table (offset 0) onto the centre of the new one,
  so offset 0 keeps its value exactly; an unchanged grid returns the table itself. Used at run
  time for inputs at another resolution and by warm starts (``train.init_from``) that move a
  checkpoint to a new grid.
  """
  target = (table.shape[0], 2 * height - 1, 2 * width - 1)
  if tuple(table.shape) == target:
    return table
  return jax.image.resize(table, target, "bilinear")


class RelativePositionBias(nn.Module):
  """Learned 2-D relative position bias, one table per head (Swin/MaxViT style).

  The table is sized for the training grid ``train_grid``; at any other resolution it is
  resized bilinearly to ``(2h-1, 2w-1)`` before the lookup, so the same parameters serve any
  input size (MaxViT does the same when fine-tuning at higher resolution).
  """
  num_heads: int
  train_grid: tuple[int, int]

  @nn.compact
  def __call__(self, height: int, width: int) -> jax.Array:
    gh, gw = self.train_grid
    table = self.param(
        "table",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("heads", None, None)),
        (self.num_heads, 2 * gh - 1, 2 * gw - 1), jnp.float32)
    table = resize_relative_position_table(table, height, width)
    idx = relative_position_index(height, width)
    bias = table[:, idx[..., 0], idx[..., 1]]  # [heads, hw, hw]
    return bias[None]


def _projection(features: int, axes: tuple[str, str], dtype, name: str) -> nn.Dense:
  """A 2-D ``nn.Dense`` projection (not ``DenseGeneral``: flax#3676) with logical axis names."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


class MultiHeadSelfAttention(nn.Module):
  """Global self-attention over NHWC feature maps, projections as 2-D kernels.

  2-D ``nn.Dense`` kernels (not ``DenseGeneral``) keep logical partitioning working under
  ``jax.set_mesh`` (flax#3676). ``position``: ``relative_bias`` (the classifier's learned table,
  sized for ``train_grid``), ``rope`` (2-D rotary on queries and keys, ``train_grid`` unused) or
  ``none``. ``qk_norm`` adds RMSNorm on queries and keys (before RoPE, as SD3 / FLUX).
  """
  num_heads: int
  head_dim: int
  train_grid: tuple[int, int]
  implementation: str = "auto"
  dtype: Any = jnp.float32
  position: str = "relative_bias"
  qk_norm: bool = False
  rope_base: float = rope_lib.DEFAULT_BASE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.position not in POSITION_ENCODINGS:
      raise ValueError(f"position encoding {self.position!r} is not one of {POSITION_ENCODINGS}")
    b, h, w, c = x.shape
    inner = self.num_heads * self.head_dim
    tokens = x.reshape(b, h * w, c)

    def project(name):
      y = _projection(inner, ("embed", "heads"), self.dtype, name)(tokens)
      return y.reshape(b, h * w, self.num_heads, self.head_dim)

    q, k, v = project("query"), project("key"), project("value")
    if self.qk_norm:
      q = rope_lib.qk_rms_norm(self.dtype, "query_norm")(q)
      k = rope_lib.qk_rms_norm(self.dtype, "key_norm")(k)
    bias = None
    if self.position == "relative_bias":
      bias = RelativePositionBias(self.num_heads, self.train_grid, name="rel_pos")(h, w)
    elif self.position == "rope":
      q = rope_lib.apply_rope_2d(q, h, w, self.rope_base)
      k = rope_lib.apply_rope_2d(k, h, w, self.rope_base)
    out = dot_product_attention(q, k, v, bias, implementation=self.implementation)
    out = out.reshape(b, h * w, inner)
    out = _projection(c, ("heads", "embed"), self.dtype, "out")(out)
    return out.reshape(b, h, w, c)


class MultiHeadCrossAttention(nn.Module):
  """Image tokens attend to a context: queries from ``x`` (NHWC), keys and values from
  ``context`` ``[B, L, D_ctx]`` (class tokens or text embeddings; the module does not care
  which). ``context_mask`` ``[B, L]`` (True = real token) masks keys. No position encoding: the
  context's own order is whatever its encoder gave it. ``qk_norm`` as in self-attention.
  """
  num_heads: int
  head_dim: int
  implementation: str = "auto"
  dtype: Any = jnp.float32
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    b, h, w, c = x.shape
    if context.ndim != 3 or context.shape[0] != b:
      raise ValueError(f"context must be [batch={b}, tokens, features], got {context.shape}")
    n_ctx = context.shape[1]
    inner = self.num_heads * self.head_dim
    tokens = x.reshape(b, h * w, c)
    context = context.astype(self.dtype)
    q = _projection(inner, ("embed", "heads"), self.dtype, "query")(tokens)
    k = _projection(inner, ("embed", "heads"), self.dtype, "key")(context)
    v = _projection(inner, ("embed", "heads"), self.dtype, "value")(context)
    q = q.reshape(b, h * w, self.num_heads, self.head_dim)
    k = k.reshape(b, n_ctx, self.num_heads, self.head_dim)
    v = v.reshape(b, n_ctx, self.num_heads, self.head_dim)
    if self.qk_norm:
      q = rope_lib.qk_rms_norm(self.dtype, "query_norm")(q)
      k = rope_lib.qk_rms_norm(self.dtype, "key_norm")(k)
    out = dot_product_attention(q, k, v, key_mask=context_mask,
                                implementation=self.implementation)
    out = _projection(c, ("heads", "embed"), self.dtype, "out")(out.reshape(b, h * w, inner))
    return out.reshape(b, h, w, c)
