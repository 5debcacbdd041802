"""One attention function for every T block, with interchangeable implementations.

``dot_product_attention(q, k, v, bias, implementation=...)`` takes ``q, k, v`` as
``[batch, tokens, heads, head_dim]`` and an optional additive ``bias``: an array broadcastable to
``[batch, heads, q_tokens, kv_tokens]`` (the classifier's relative position bias) or a
``separable_bias.SeparableBias`` (row + column offset tables that the Pallas path folds into the
features, so no ``N x N`` bias is ever built). Implementations:

* ``xla``    reference: einsum, softmax in float32; any backend.
* ``cudnn``  ``jax.nn.dot_product_attention(implementation='cudnn')``: the fused cuDNN kernel on
             NVIDIA GPUs (bf16/fp16 inputs only).
* ``pallas`` the Pallas TPU flash-attention kernel (``models/pallas_flash.py``): no bias tensor
             when there is no bias, padding masked by segment ids, block sizes chosen per shape.
* ``auto``   the fastest available. First the measurements recorded in the repository
             (``ascan_jax/perf/attention_choices.json``, read by ``perf.attention_table``; written
             by ``python -m ascan_jax.tools.accelerator_report`` on an accelerator): the entry for
             this device kind, dtype, head dim and sequence length, if there is one and its
             choice is usable here. With no measurement for the device (every device until an
             accelerator run is copied in) the rules of thumb apply: ``cudnn`` on GPU for
             bf16/fp16, ``pallas`` on TPU for sequences of at least ``PALLAS_MIN_SEQ_LEN`` tokens,
             ``xla`` otherwise (maxdiffusion uses the same kind of minimum length).

Keys may be masked with ``key_mask`` (``[batch, kv_tokens]``, True = attend), e.g. the padding
of a text context; a query whose keys are all masked gets a zero output (no context). Only
``xla`` implements the mask and queries/keys of different lengths for every backend: ``cudnn``
falls back to ``xla`` when a mask is given, ``pallas`` when a mask is given or the key length
differs from the query length (cross-attention). The UNet's cross-attention has short contexts
(1 class token, 77-ish text tokens), where a fused kernel gains little.

Tensor parallelism splits whole heads: the projections' fused ``heads*head_dim`` output is
reshaped to ``[B, N, heads, head_dim]`` and constrained to the logical axes
``("batch", "length", "heads", "kv")`` (``heads_spec``). "kv" (the head dim) has no mesh rule, so a
head is never split; when the mesh axes of "heads" (``tensor``) do not divide the head count, the
heads are replicated for the attention itself (each tensor shard computes all heads; the
projection kernels keep whatever sharding ``parallel.sharding`` gave them and GSPMD gathers).
That fallback is correct but spends ``tensor``-fold attention compute: choose ``tensor`` to
divide the head counts of the T blocks.

Also here: the learned 2-D relative position bias of classification attention, and the two
attention modules, ``MultiHeadSelfAttention`` (position encoding ``relative_bias`` for the
classifier, ``relative_bias_separable`` for large grids, ``rope`` 2-D rotary for the UNet, or
``none``; optional query/key RMSNorm) and ``MultiHeadCrossAttention`` (queries from image tokens,
keys and values from a context).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import pallas_flash
from ascan_jax.models import rope as rope_lib
from ascan_jax.models import separable_bias as separable_lib
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.perf import attention_table

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
POSITION_ENCODINGS = ("relative_bias", "relative_bias_separable", "rope", "none")
PALLAS_MIN_SEQ_LEN = 1024
HEAD_AXES = ("batch", "length", "heads", "kv")  # logical names of a [B, N, H, D] activation.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def resolve_implementation(implementation: str, dtype: Any, seq_len: int, head_dim: int,
                           platform: str | None = None, *, device_kind: str | None = None,
                           table=None) -> str:
  """Turns ``auto`` into a concrete implementation; checks the others are usable.

  ``auto`` looks up ``table`` (default: the entries of ``perf/attention_choices.json``) for
  ``device_kind`` (default: the first JAX device's, when ``platform`` is the default backend or
  not given; a platform given for another backend has no device kind, so only the rules apply),
  then falls back to the rules of thumb (module docstring)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if device_kind is None and platform in (None, jax.default_backend()):
    device_kind = jax.devices()[0].device_kind
  platform = platform or jax.default_backend()
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  cudnn_ok = platform == "gpu" and low_precision and head_dim % 8 == 0 and head_dim <= 128
  if implementation == "auto":
    measured = attention_table.choose(
        attention_table.load() if table is None else table, platform=platform,
        device_kind=device_kind, dtype=jnp.dtype(dtype).name, seq_len=seq_len,
        head_dim=head_dim)
    if measured == "xla" or (measured == "cudnn" and cudnn_ok) or (
        measured == "pallas" and platform == "tpu"):
      return measured
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


def heads_spec(shape) -> jax.sharding.PartitionSpec | None:
  """Mesh axes of a ``[B, N, heads, head_dim]`` activation under the active mesh and rules.

  ``None`` without a mesh or rules. Whole heads only: mesh axes that do not divide the head
  count are dropped (the heads are then replicated), and the head dim is never split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  return sharding_lib.spec_for(HEAD_AXES, shape, mesh, rules)


def constrain_heads(x: jax.Array) -> jax.Array:
  """``x`` (``[B, N, heads, head_dim]``) constrained to ``heads_spec``; unchanged without a mesh."""
  spec = heads_spec(x.shape)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


_IMPLS = {"xla": _xla_attention, "cudnn": _cudnn_attention,
          "pallas": pallas_flash.flash_attention_sharded}


def dot_product_attention(q, k, v, bias=None, *, key_mask=None, implementation: str = "auto",
                          scale: float | None = None):
  """Multi-head attention ``softmax(q k^T * scale + bias) v`` on ``[B, N, H, D]`` inputs.

  ``k`` and ``v`` may have another token count than ``q`` (cross-attention). ``key_mask``
  (``[B, kv_tokens]``, True = attend) masks keys; see the module docstring for which
  implementations fall back to ``xla`` then. ``bias`` may be a ``SeparableBias`` (self-attention
  only): ``pallas`` folds it into the features, the others add its dense form.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  separable = isinstance(bias, separable_lib.SeparableBias)
  if separable:
    if k.shape[1] != q.shape[1]:
      raise ValueError(f"a SeparableBias needs self-attention, got {q.shape[1]} query and "
                       f"{k.shape[1]} key tokens")
    bias.check(q.shape[2], q.shape[1])
  impl = resolve_implementation(implementation, q.dtype, q.shape[1], q.shape[-1])
  if key_mask is not None:
    if key_mask.shape != (k.shape[0], k.shape[1]):
      raise ValueError(f"key_mask shape {key_mask.shape} is not [batch, kv_tokens] = "
                       f"{(k.shape[0], k.shape[1])}")
    impl = "xla"
  if impl == "pallas" and k.shape[1] != q.shape[1]:
    impl = "xla"
  if separable and impl != "pallas":
    bias = bias.dense()
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
  and without anti-aliasing (as timm's table resizing) a smaller grid samples rather than blurs,
  so offset 0 keeps its value exactly either way; an unchanged grid returns the table itself.
  Used at run time for inputs at another resolution and by warm starts (``train.init_from``)
  that move a checkpoint to a new grid.
  """
  target = (table.shape[0], 2 * height - 1, 2 * width - 1)
  if tuple(table.shape) == target:
    return table
  return jax.image.resize(table, target, "bilinear", antialias=False)


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
  sized for ``train_grid``), ``relative_bias_separable`` (row + column tables, parameters
  ``rel_pos_separable/{row,col}``: for large grids, see ``separable_bias``), ``rope`` (2-D rotary
  on queries and keys, ``train_grid`` unused) or ``none``. ``qk_norm`` adds RMSNorm on queries and
  keys (before RoPE, as SD3 / FLUX). Heads are split whole over ``tensor`` (module docstring).
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
      return constrain_heads(y.reshape(b, h * w, self.num_heads, self.head_dim))

    q, k, v = project("query"), project("key"), project("value")
    if self.qk_norm:
      q = rope_lib.qk_rms_norm(self.dtype, "query_norm")(q)
      k = rope_lib.qk_rms_norm(self.dtype, "key_norm")(k)
    bias = None
    if self.position == "relative_bias":
      bias = RelativePositionBias(self.num_heads, self.train_grid, name="rel_pos")(h, w)
    elif self.position == "relative_bias_separable":
      bias = separable_lib.SeparableRelativePositionBias(
          self.num_heads, self.train_grid, name="rel_pos_separable")(h, w)
    elif self.position == "rope":
      q = rope_lib.apply_rope_2d(q, h, w, self.rope_base)
      k = rope_lib.apply_rope_2d(k, h, w, self.rope_base)
    out = dot_product_attention(q, k, v, bias, implementation=self.implementation)
    out = constrain_heads(out).reshape(b, h * w, inner)
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
    q = constrain_heads(q.reshape(b, h * w, self.num_heads, self.head_dim))
    k = constrain_heads(k.reshape(b, n_ctx, self.num_heads, self.head_dim))
    v = constrain_heads(v.reshape(b, n_ctx, self.num_heads, self.head_dim))
    if self.qk_norm:
      q = rope_lib.qk_rms_norm(self.dtype, "query_norm")(q)
      k = rope_lib.qk_rms_norm(self.dtype, "key_norm")(k)
    out = dot_product_attention(q, k, v, key_mask=context_mask,
                                implementation=self.implementation)
    out = constrain_heads(out).reshape(b, h * w, inner)
    out = _projection(c, ("heads", "embed"), self.dtype, "out")(out)
    return out.reshape(b, h, w, c)
