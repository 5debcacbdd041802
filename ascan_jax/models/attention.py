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

Also here: the learned 2-D relative position bias of classification attention.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
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


def _xla_attention(q, k, v, bias, scale):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


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


def dot_product_attention(q, k, v, bias=None, *, implementation: str = "auto",
                          scale: float | None = None):
  """Multi-head attention ``softmax(q k^T * scale + bias) v`` on ``[B, N, H, D]`` inputs."""
  if scale is None:
    scale = q.shape[-1] ** -0.5
  impl = resolve_implementation(implementation, q.dtype, q.shape[1], q.shape[-1])
  return _IMPLS[impl](q, k, v, bias, scale)


def relative_position_index(height: int, width: int) -> np.ndarray:
  """``[h*w, h*w, 2]`` offsets (dy, dx) shifted to be >= 0, as indices into a bias table."""
  coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
  coords = coords.reshape(-1, 2)
  rel = coords[:, None, :] - coords[None, :, :]
  rel += np.array([height - 1, width - 1])
  return rel


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
    if (height, width) != (gh, gw):
      table = jax.image.resize(table, (self.num_heads, 2 * height - 1, 2 * width - 1), "bilinear")
    idx = relative_position_index(height, width)
    bias = table[:, idx[..., 0], idx[..., 1]]  # [heads, hw, hw]
    return bias[None]


class MultiHeadSelfAttention(nn.Module):
  """Global self-attention over NHWC feature maps, projections as 2-D kernels.

  2-D ``nn.Dense`` kernels (not ``DenseGeneral``) keep logical partitioning working under
  ``jax.set_mesh`` (flax#3676).
  """
  num_heads: int
  head_dim: int
  train_grid: tuple[int, int]
  implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    inner = self.num_heads * self.head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    tokens = x.reshape(b, h * w, c)

    def project(name):
      y = dense(inner, name=name, kernel_init=nn.with_logical_partitioning(
          nn.initializers.xavier_uniform(), ("embed", "heads")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)))(tokens)
      return y.reshape(b, h * w, self.num_heads, self.head_dim)

    q, k, v = project("query"), project("key"), project("value")
    bias = RelativePositionBias(self.num_heads, self.train_grid, name="rel_pos")(h, w)
    out = dot_product_attention(q, k, v, bias, implementation=self.implementation)
    out = out.reshape(b, h * w, inner)
    out = dense(c, name="out", kernel_init=nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ("heads", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)
    return out.reshape(b, h, w, c)
