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

Stochastic depth (``DropPath``) drops a whole residual branch per example in training.
Normalisation statistics and softmax are computed in float32 (flax upcasts internally).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import attention as attention_lib

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "embed")


def conv(features: int, kernel: int, stride: int = 1, *, dtype, name: str, use_bias: bool = False):
  """A NHWC convolution whose kernel carries logical axis names."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
                     CONV_KERNEL_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def batch_norm(train: bool, momentum: float, dtype, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def layer_norm(dtype, name: str):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def group_norm(groups: int, dtype, name: str):
  """GroupNorm over the channel axis of NHWC maps (statistics in float32)."""
  return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


NORMS = ("batch", "group")


def dense(features: int, axes: tuple[str, str], *, dtype, name: str):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def constrain(x: jax.Array) -> jax.Array:
  """Names a NHWC activation's axes so the mesh rules decide its sharding."""
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


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
  """Channel gating: global mean, 1x1 reduce, GELU, 1x1 expand, sigmoid."""
  reduced_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    s = conv(self.reduced_features, 1, dtype=self.dtype, name="reduce", use_bias=True)(s)
    s = nn.gelu(s)
    s = conv(x.shape[-1], 1, dtype=self.dtype, name="expand", use_bias=True)(s)
    return x * nn.sigmoid(s)


class ConvBlock(nn.Module):
  """FusedMBConv with squeeze-excite (the AsCAN "C" block).

  ``norm``: ``batch`` (classifier) or ``group`` (UNet, ``norm_groups`` groups). ``emb`` (optional
  ``[B, E]``) is projected and added per channel after the expansion conv and its norm.
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

  def _norm(self, train: bool, name: str):
    if self.norm == "batch":
      return batch_norm(train, self.bn_momentum, self.dtype, f"{name}_bn")
    if self.norm == "group":
      return group_norm(self.norm_groups, self.dtype, f"{name}_norm")
    raise ValueError(f"ConvBlock norm {self.norm!r} is not one of {NORMS}")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, emb: jax.Array | None = None) -> jax.Array:
    in_features = x.shape[-1]
    mid = in_features * self.expand_ratio
    y = conv(mid, 3, self.stride, dtype=self.dtype, name="expand_conv")(x)
    y = self._norm(train, "expand")(y)
    if emb is not None:
      e = dense(mid, ("embed", "mlp"), dtype=self.dtype, name="emb_proj")(
          nn.silu(emb.astype(self.dtype)))
      y = y + e[:, None, None, :]
    y = nn.gelu(y)
    y = SqueezeExcite(max(1, int(in_features * self.se_ratio)), self.dtype, name="se")(y)
    y = conv(self.features, 1, dtype=self.dtype, name="project_conv")(y)
    y = self._norm(train, "project")(y)
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
    mlp = nn.with_logical_constraint(nn.gelu(mlp), ACTIVATION_AXES[:3] + ("mlp",))
    mlp = dense(c, ("mlp", "embed"), dtype=self.dtype, name="mlp_out")(mlp)
    y = DropPath(self.drop_path, name="drop_path")(attn + mlp, deterministic=not train)
    return constrain(x + y)


class Downsample(nn.Module):
  """3x3 stride-2 convolution + BatchNorm, for stages whose first block is a T block."""
  features: int
  stride: int = 2
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv")(x)
    return batch_norm(train, self.bn_momentum, self.dtype, "bn")(x)
