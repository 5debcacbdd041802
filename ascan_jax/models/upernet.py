"""UperNet semantic-segmentation head on an AsCAN backbone (NHWC, float32 parameters).

The structure follows mmsegmentation's ``UPerHead`` and ``FCNHead`` (Xiao et al. 2018, "Unified
Perceptual Parsing"; the AsCAN paper, appendix A.3, trains this head on ADE20K with backbone
features from stages S2, S3 and S4):

* ``ConvModule``: convolution without bias, BatchNorm, ReLU (mmseg's ConvModule with a norm).
* Pyramid pooling on the coarsest used level: adaptive average pooling to 1, 2, 3 and 6 bins,
  a 1x1 ConvModule each, bilinear upsampling back, concatenation with the input, 3x3 ConvModule.
* FPN: 1x1 lateral ConvModules on the other levels, a top-down pathway (upsample the coarser
  level, add), a 3x3 ConvModule per level (not on the pyramid-pooling output).
* Fusion: every level upsampled to the finest, concatenated, 3x3 ConvModule, channel dropout
  (mmseg's ``Dropout2d``: whole channels per example), 1x1 classifier with a bias.
* Auxiliary ``FCNHead`` (mmseg's UperNet configs: one 3x3 ConvModule of 256 channels, dropout
  0.1, 1x1 classifier) on stage 3. Its loss weight in mmseg is 0.4; the weight belongs to the
  task (``ascan_jax.models.segmentation_loss.segmentation_loss(aux_weight=0.4)``).

Resizing is bilinear with half-pixel centres (PyTorch ``align_corners=False``, mmseg's default)
and no antialiasing, in float32. Adaptive pooling uses PyTorch's bin rule (bin ``i`` of ``n``
over ``L`` inputs covers ``[floor(i L / n), ceil((i + 1) L / n))``), so feature maps of any size
pool the way mmseg's ``nn.AdaptiveAvgPool2d`` does.

BatchNorm: ``batch_norm="global"`` (default): under ``jit`` with a batch sharded over devices
the statistics are those of the global batch, i.e. mmseg's SyncBN; ``"per_device"``: each
device's share only (``blocks.ShardLocalBatchNorm``). The classifier is initialised with N(0, 0.01) and zero bias
(mmseg's ``BaseDecodeHead``); the ConvModules use the backbone's He (fan-out) initialisation.
Logical axis names: kernels ``(None, None, conv_in, conv_out)``, the classifier's output axis
``classes``, norms ``conv_out``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import blocks

POOL_SCALES = (1, 2, 3, 6)
LOGIT_AXES = ("batch", "height", "width", "classes")


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` averaging weights of PyTorch's adaptive average pooling bins."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, out, out, C]`` in float32 (separable: rows, then columns)."""
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_size))
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_size))
  x = x.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=hi)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """NHWC bilinear resize with half-pixel centres and no antialiasing (PyTorch's
  ``F.interpolate(mode='bilinear', align_corners=False)``), computed in float32."""
  if x.shape[1] == height and x.shape[2] == width:
    return x
  return jax.image.resize(x.astype(jnp.float32), (x.shape[0], height, width, x.shape[3]),
                          "bilinear", antialias=False)


class ConvModule(nn.Module):
  """Convolution (no bias) + BatchNorm + ReLU."""
  features: int
  kernel: int
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"  # blocks.batch_norm's stats: global (SyncBN) | per_device.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = blocks.conv(self.features, self.kernel, dtype=self.dtype, name="conv")(x.astype(self.dtype))
    x = blocks.batch_norm(train, self.bn_momentum, self.dtype, "bn", stats=self.batch_norm)(x)
    return blocks.constrain(nn.relu(x))


class Classifier(nn.Module):
  """Channel dropout (whole channels per example, mmseg's ``Dropout2d``) + 1x1 convolution to
  float32 class logits."""
  num_classes: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    x = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, param_dtype=jnp.float32,
                name="conv_seg",
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                         (None, None, "conv_in", "classes")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)))(x)
    return nn.with_logical_constraint(x, LOGIT_AXES)


class PyramidPooling(nn.Module):
  """PSP module: pooled branches upsampled and concatenated with the input, then a 3x3 conv."""
  channels: int
  pool_scales: Sequence[int] = POOL_SCALES
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h, w = x.shape[1:3]
    outs = [x.astype(self.dtype)]
    for scale in self.pool_scales:
      y = adaptive_avg_pool(x, scale)
      y = ConvModule(self.channels, 1, self.bn_momentum, self.dtype, self.batch_norm,
                     name=f"pool{scale}")(y, train)
      outs.append(resize_bilinear(y, h, w).astype(self.dtype))
    y = jnp.concatenate(outs, axis=-1)
    return ConvModule(self.channels, 3, self.bn_momentum, self.dtype, self.batch_norm,
                      name="bottleneck")(y, train)


class UperNetHead(nn.Module):
  """mmseg's UPerHead: ``__call__(features fine -> coarse, train)`` -> logits ``[B, h, w, K]`` at
  the finest feature level's resolution, float32."""
  num_classes: int
  channels: int = 512
  pool_scales: Sequence[int] = POOL_SCALES
  dropout: float = 0.1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
    if not features:
      raise ValueError("UperNetHead needs at least one feature map")
    conv = lambda k, name: ConvModule(self.channels, k, self.bn_momentum, self.dtype,
                                      self.batch_norm, name=name)
    laterals = [conv(1, f"lateral{i}")(f, train) for i, f in enumerate(features[:-1])]
    laterals.append(PyramidPooling(self.channels, tuple(self.pool_scales), self.bn_momentum,
                                   self.dtype, self.batch_norm, name="psp")(features[-1], train))
    for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
      h, w = laterals[i - 1].shape[1:3]
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], h, w).astype(self.dtype)
    outs = [conv(3, f"fpn{i}")(lat, train) for i, lat in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    h, w = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(o, h, w).astype(self.dtype) for o in outs[1:]]
    y = conv(3, "fpn_bottleneck")(jnp.concatenate(outs, axis=-1), train)
    return Classifier(self.num_classes, self.dropout, name="classifier")(y, train)


class FCNHead(nn.Module):
  """mmseg's FCNHead as UperNet's auxiliary head: ``num_convs`` 3x3 ConvModules, dropout, 1x1
  classifier (no concatenation of the input)."""
  num_classes: int
  channels: int = 256
  num_convs: int = 1
  dropout: float = 0.1
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_convs):
      x = ConvModule(self.channels, 3, self.bn_momentum, self.dtype, self.batch_norm,
                     name=f"conv{i}")(x, train)
    return Classifier(self.num_classes, self.dropout, name="classifier")(x, train)


class SegmentationModel(nn.Module):
  """Backbone + UperNet (+ auxiliary FCN head).

  ``backbone`` must return the list of its stage outputs (``AsCAN(features_only=True)``);
  ``feature_stages`` are 1-based stage numbers fed to UperNet (the paper: S2, S3, S4);
  ``aux_stage`` (1-based, ``None`` for no auxiliary head) feeds the FCN head. Images are used as
  given: normalisation belongs to the caller.

  ``__call__(images, train, with_aux=None)`` -> ``(logits, aux_logits)``, both ``[B, H, W, K]``
  float32 at the input resolution; ``aux_logits`` is computed when ``with_aux`` (default: in
  training) and is ``None`` otherwise. Its parameters are always created at ``init``.
  """
  backbone: nn.Module
  num_classes: int
  feature_stages: Sequence[int] = (2, 3, 4)
  aux_stage: int | None = 3
  channels: int = 512
  aux_channels: int = 256
  dropout: float = 0.1
  pool_scales: Sequence[int] = POOL_SCALES
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  batch_norm: str = "global"  # the heads' BatchNorm statistics (the backbone has its own key).

  def _check_stages(self, num_stages: int):
    stages = tuple(self.feature_stages)
    if not stages or list(stages) != sorted(set(stages)) or stages[0] < 1 or \
        stages[-1] > num_stages:
      raise ValueError(f"feature_stages={stages} must be increasing 1-based stage numbers of the "
                       f"backbone's {num_stages} stages")
    if self.aux_stage is not None and not 1 <= self.aux_stage <= num_stages:
      raise ValueError(f"aux_stage={self.aux_stage} is not a stage of the backbone "
                       f"(1..{num_stages})")

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, with_aux: bool | None = None):
    features = self.backbone(images, train=train)
    if not isinstance(features, (list, tuple)):
      raise ValueError("SegmentationModel's backbone must return its list of stage outputs: "
                       "build it with AsCAN(..., features_only=True)")
    self._check_stages(len(features))
    height, width = images.shape[1:3]
    logits = UperNetHead(self.num_classes, self.channels, tuple(self.pool_scales), self.dropout,
                         self.bn_momentum, self.dtype, self.batch_norm, name="decode_head")(
                             [features[s - 1] for s in self.feature_stages], train)
    logits = nn.with_logical_constraint(resize_bilinear(logits, height, width), LOGIT_AXES)
    with_aux = train if with_aux is None else with_aux
    aux = None
    if self.aux_stage is not None and (with_aux or self.is_initializing()):
      aux = FCNHead(self.num_classes, self.aux_channels, dropout=self.dropout,
                    bn_momentum=self.bn_momentum, dtype=self.dtype,
                    batch_norm=self.batch_norm, name="auxiliary_head")(
                        features[self.aux_stage - 1], train)
      aux = nn.with_logical_constraint(resize_bilinear(aux, height, width), LOGIT_AXES)
      if not with_aux:
        aux = None
    return logits, aux

