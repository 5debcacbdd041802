"""AsCAN's two building blocks (arXiv 2411.04967, section 3.1), NHWC, float32 parameters.

* ``ConvBlock`` ("C"): FusedMBConv, ``y = x + P(SE(C(x)))``. C is a dense 3x3 convolution that
  expands the channels 4x, then BatchNorm and GELU; SE is squeeze-excite with ratio 0.25; P is a
  1x1 projection back to the output width. Choices the paper leaves open (written down here):
  P is followed by BatchNorm (EfficientNetV2 does this); SE reduces to ``se_ratio`` x the
  block's *input* width, with GELU inside and a sigmoid gate; the expansion is relative to the
  input width. A stage's first block may change width and use stride 2: the shortcut is then
  2x2 average pooling followed by a 1x1 convolution (MaxViT's MBConv shortcut).
* ``TransformerBlock`` ("T"): one pre-norm and attention and MLP in parallel,
  ``y = x + attn(ln(x)) + mlp(ln(x))`` (ViT-22B style; the issue fixes this form; the printed
  ``LN(GELU(x))`` of the paper's equation is treated as an extraction artefact). Global
  multi-head self-attention with a learned 2-D relative position bias, MLP ratio 4, GELU.
* ``Downsample``: a 3x3 stride-2 convolution plus BatchNorm, used only when a stage starts with a
  T block (the "T before C" ablations), because a T block keeps width and resolution.

Opt-in extensions for the diffusion UNet (``ascan_jax.models.unet``); the defaults keep the
classifier's blocks, parameter names and numerics unchanged:

* ``ConvBlock(norm="group")``: GroupNorm (``norm_groups`` groups) instead of BatchNorm.
  BatchNorm's batch statistics do not suit diffusion: a training batch mixes noise levels and
  dropped conditions, a guided sampling batch concatenates conditional and unconditional passes,
  and running averages would make training and sampling see different normalisations (SD and
  SDXL use GroupNorm for the same reason). The GroupNorm parameters are named ``expand_norm`` /
  ``project_norm``.
* ``ConvBlock.__call__(x, train, emb)``: an embedding ``[B, E]`` (the timestep embedding) is
  passed through SiLU and a Dense (``emb_proj``, to the expanded width) and added per channel
  after the expansion convolution and its norm, before the GELU (SDXL's ResBlock adds it after
  its first convolution; adding it after the norm keeps the norm from removing the shift).
* ``TransformerBlock(position="rope", qk_norm=True, cross_attention=True)``: 2-D RoPE instead of
  the relative position bias, RMSNorm on queries and keys, and cross-attention to a context
  computed in parallel with self-attention from the same pre-norm:
  ``y = x + self_attn(ln x) + cross_attn(ln x, ctx) + mlp(ln x)``.

Tensor parallelism (Megatron-style, like the T block's MLP): the C block's expansion kernel is
``("embed", "mlp")`` (column-parallel), the expanded activation is constrained to
``("batch", "height", "width", "mlp")``, squeeze-excite works on those sharded channels, and the
projection kernel is ``("mlp", "embed")`` (row-parallel, one all-reduce of the block's *output*).
With the default rules ``mlp -> tensor`` and ``embed -> fsdp``, so the 4x-expanded activation
never crosses devices; the kernel shapes and parameter names are those of the column-parallel
version, so checkpoints load unchanged.

Choices kept as settings (the classification task exposes them as ``model.gelu`` and
``model.batch_norm``; the module defaults keep the numerics every caller had before):

* ``gelu``: ``exact`` (erf; PyTorch's and timm's ``nn.GELU`` default, which the paper's
  timm-based recipe used) or ``tanh`` (the approximation, flax's ``nn.gelu`` default, with which
  runs before the setting existed were trained).
* ``batch_norm``: ``global`` computes BatchNorm's batch statistics over the whole (global) batch
  under ``jit`` (SyncBN: small per-channel all-reduces in every layer's forward and backward;
  results do not depend on the device count) or ``per_device`` over each data-parallel shard of
  the batch (``ShardLocalBatchNorm``: PyTorch DDP's per-GPU BN, no collective on the forward or
  backward path).

Stochastic depth (``DropPath``) drops a whole residual branch per example in training.
Normalisation statistics and softmax are computed in float32 (flax upcasts internally).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import attention as attention_lib
from ascan_jax.parallel import sharding as sharding_lib

ACTIVATION_AXES = ("batch", "height", "width", "embed")
EXPANDED_AXES = ACTIVATION_AXES[:3] + ("mlp",)  # C blocks' expanded maps, T blocks' MLP hidden.
GELUS = ("exact", "tanh")
BATCH_NORMS = ("global", "per_device")


def gelu(x: jax.Array, kind: str = "tanh") -> jax.Array:
  """GELU, ``exact`` (erf) or its ``tanh`` approximation (see the module docstring)."""
  if kind not in GELUS:
    raise ValueError(f"gelu {kind!r} is not one of {GELUS}")
  return nn.gelu(x, approximate=kind == "tanh")


def conv(features: int, kernel: int, stride: int = 1, *, dtype, name: str, use_bias: bool = False,
         axes: Sequence[str | None] = ("conv_in", "conv_out")):
  """A NHWC convolution whose kernel carries logical axis names: ``axes`` names its input and
  output channels (the default: column-parallel under the default rules); the spatial
  dimensions are never sharded."""
  in_axis, out_axis = axes
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
                     (None, None, in_axis, out_axis)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)))


def batch_shard_count(batch_size: int) -> int:
  """How many data-parallel shards a batch of ``batch_size`` has under the mesh and logical rules
  of the current trace (``ascan_jax.parallel.sharding.in_mesh``); 1 outside of one."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return 1
  axes = sharding_lib.spec_for(("batch",), (batch_size,), mesh, rules)[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


class ShardLocalBatchNorm(nn.Module):
  """BatchNorm whose training statistics come from each data-parallel shard of the batch.

  The same variables, initialisers and arithmetic as ``flax.linen.BatchNorm`` (``scale``/``bias``
  parameters, ``batch_stats`` ``mean``/``var``; float32 statistics, ``E[x^2] - E[x]^2`` clipped at
  0, biased variance), so checkpoints move freely between the two. In training the batch is
  viewed as ``[shards, batch / shards, ...]`` (``batch_shard_count``) and each shard is
  normalised with its own mean and variance; the sharding of the batch axis carries over to the
  shard axis, so no statistic crosses devices. The running averages move once per step towards
  the mean over shards of the shard statistics (timm's ``--dist-bn reduce``), one small
  all-reduce that nothing in the forward pass waits for. Outside a mesh (one shard) it equals
  ``flax.linen.BatchNorm``.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axes: tuple[str | None, ...] = ("conv_out",)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                       (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                      (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return y.astype(self.dtype)
    shards = batch_shard_count(x.shape[0])
    grouped = x.reshape((shards, x.shape[0] // shards) + x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, grouped.ndim - 1))
    mean = jnp.mean(grouped, axes, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(grouped), axes, keepdims=True) - jnp.square(mean))
    if not self.is_initializing():
      flat = lambda s: jnp.mean(s.reshape(shards, c), axis=0)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * flat(mean)
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * flat(var)
    y = (grouped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def batch_norm(train: bool, momentum: float, dtype, name: str, *, stats: str = "global",
               axes: tuple[str | None, ...] = ("conv_out",)):
  """BatchNorm with float32 statistics; ``stats``: ``global`` (flax's, statistics over the
  global batch) or ``per_device`` (``ShardLocalBatchNorm``); ``axes``: the logical name of the
  channel axis of its parameters."""
  if stats == "global":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes))
  if stats == "per_device":
    return ShardLocalBatchNorm(not train, momentum, 1e-5, dtype, tuple(axes), name=name)
  raise ValueError(f"batch_norm {stats!r} is not one of {BATCH_NORMS}")


def layer_norm(dtype, name: str):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def group_norm(groups: int, dtype, name: str, axes: tuple[str | None, ...] = ("conv_out",)):
  """GroupNorm over the channel axis of NHWC maps (statistics in float32)."""
  return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes))


NORMS = ("batch", "group")


def dense(features: int, axes: tuple[str, str], *, dtype, name: str):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def constrain(x: jax.Array, axes: tuple[str | None, ...] = ACTIVATION_AXES) -> jax.Array:
  """Names a NHWC activation's axes so the mesh rules decide its sharding."""
  return nn.with_logical_constraint(x, axes)


class DropPath(nn.Module):
  """Stochastic depth: zeroes the residual branch of a random subset of examples in training."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
  """Channel gating: global mean, 1x1 reduce, GELU, 1x1 expand, sigmoid.

  Works on the C block's expanded (``mlp``, tensor-sharded) channels: the reduce kernel is
  row-parallel (an all-reduce of the tiny ``[B, 1, 1, reduced]`` result), the expand kernel
  column-parallel, so the gate comes out sharded like the activation it scales."""
  reduced_features: int
  dtype: Any = jnp.float32
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    s = conv(self.reduced_features, 1, dtype=self.dtype, name="reduce", use_bias=True,
             axes=("mlp", "embed"))(s)
    s = gelu(s, self.gelu)
    s = conv(x.shape[-1], 1, dtype=self.dtype, name="expand", use_bias=True,
             axes=("embed", "mlp"))(s)
    return x * nn.sigmoid(s)


class ConvBlock(nn.Module):
  """FusedMBConv with squeeze-excite (the AsCAN "C" block).

  ``norm``: ``batch`` (classifier; ``batch_norm`` global or per_device) or ``group`` (UNet,
  ``norm_groups`` groups). ``emb`` (optional ``[B, E]``) is projected and added per channel after
  the expansion conv and its norm. Expansion column-parallel, projection row-parallel (module
  docstring).
  """
  features: int
  stride: int = 1
  expand_ratio: int = 4
  se_ratio: float = 0.25
  drop_path: float = 0.0
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  norm: str = "batch"
  norm_groups: int = 32
  gelu: str = "tanh"
  batch_norm: str = "global"

  def _norm(self, train: bool, name: str, axes: tuple[str, ...]):
    if self.norm == "batch":
      return batch_norm(train, self.bn_momentum, self.dtype, f"{name}_bn", stats=self.batch_norm,
                        axes=axes)
    if self.norm == "group":
      return group_norm(self.norm_groups, self.dtype, f"{name}_norm", axes)
    raise ValueError(f"ConvBlock norm {self.norm!r} is not one of {NORMS}")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, emb: jax.Array | None = None) -> jax.Array:
    in_features = x.shape[-1]
    mid = in_features * self.expand_ratio
    y = conv(mid, 3, self.stride, dtype=self.dtype, name="expand_conv", axes=("embed", "mlp"))(x)
    y = self._norm(train, "expand", ("mlp",))(y)
    if emb is not None:
      e = dense(mid, ("embed", "mlp"), dtype=self.dtype, name="emb_proj")(
          nn.silu(emb.astype(self.dtype)))
      y = y + e[:, None, None, :]
    y = constrain(gelu(y, self.gelu), EXPANDED_AXES)
    y = SqueezeExcite(max(1, int(in_features * self.se_ratio)), self.dtype, self.gelu,
                      name="se")(y)
    y = constrain(y, EXPANDED_AXES)
    y = conv(self.features, 1, dtype=self.dtype, name="project_conv", axes=("mlp", "embed"))(y)
    y = self._norm(train, "project", ("embed",))(y)
    shortcut = x
    if self.stride > 1:
      shortcut = nn.avg_pool(shortcut, (self.stride, self.stride), (self.stride, self.stride),
                             padding="SAME")
    if in_features != self.features:
      shortcut = conv(self.features, 1, dtype=self.dtype, name="shortcut_conv", use_bias=True)(
          shortcut)
    y = DropPath(self.drop_path, name="drop_path")(y, deterministic=not train)
    return constrain(shortcut + y)


class TransformerBlock(nn.Module):
  """Parallel pre-norm transformer block with global attention (the AsCAN "T" block).

  ``position`` / ``qk_norm``: see ``attention.MultiHeadSelfAttention``. With
  ``cross_attention=True`` the call needs a ``context`` ``[B, L, D_ctx]`` (and optionally a
  ``context_mask`` ``[B, L]``), attended to in parallel with self-attention and the MLP.
  """
  num_heads: int
  head_dim: int
  train_grid: tuple[int, int]
  mlp_ratio: int = 4
  drop_path: float = 0.0
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  position: str = "relative_bias"
  qk_norm: bool = False
  cross_attention: bool = False
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    xn = layer_norm(self.dtype, "norm")(x)
    attn = attention_lib.MultiHeadSelfAttention(
        self.num_heads, self.head_dim, self.train_grid, self.attention_impl, self.dtype,
        position=self.position, qk_norm=self.qk_norm, name="attention")(xn)
    if self.cross_attention:
      if context is None:
        raise ValueError("this TransformerBlock has cross_attention=True: pass a context")
      attn = attn + attention_lib.MultiHeadCrossAttention(
          self.num_heads, self.head_dim, self.attention_impl, self.dtype, qk_norm=self.qk_norm,
          name="cross_attention")(xn, context, context_mask)
    elif context is not None:
      raise ValueError("a context was passed to a TransformerBlock without cross_attention")
    mlp = dense(c * self.mlp_ratio, ("embed", "mlp"), dtype=self.dtype, name="mlp_in")(xn)
    mlp = nn.with_logical_constraint(gelu(mlp, self.gelu), EXPANDED_AXES)
    mlp = dense(c, ("mlp", "embed"), dtype=self.dtype, name="mlp_out")(mlp)
    y = DropPath(self.drop_path, name="drop_path")(attn + mlp, deterministic=not train)
    return constrain(x + y)


class Downsample(nn.Module):
  """3x3 stride-2 convolution + BatchNorm, for stages whose first block is a T block."""
  features: int
  stride: int = 2
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv")(x)
    return batch_norm(train, self.bn_momentum, self.dtype, "bn", stats=self.batch_norm)(x)
