"""The AsCAN classification backbone (arXiv 2411.04967, section 3.1 and appendix A.1).

stem (two 3x3 convolutions, stride 2 in total) -> four stages of C and T blocks given by a layout
string (``C-CCCT-CCTT-CTTT``) -> head (1x1 projection to ``embed_dim``, BatchNorm, GELU, global
average pool, linear classifier). Every stage halves the resolution in its first block, so at
224x224 the stages run at 56, 28, 14 and 7 pixels.

Widths and depths of AsCAN-T/B/L, and why, are in ``ascan_jax.models.variants``.

Relative position tables are sized for the grids of ``table_image_size`` (a model setting, not
the data's size): stride-2 SAME convolutions give ``ceil(size / 2)`` per halving, and so does
``stage_grids``. At other input sizes the tables are resized at run time; a warm start into a
model with another ``table_image_size`` resizes them once on load (``train.init_from``).
``features_only=True`` builds the backbone without the head and classifier (dense heads such as
UperNet): the call returns the four stage outputs.

``gelu`` (``exact`` | ``tanh``) and ``batch_norm`` (``global`` | ``per_device``) reach every GELU
and BatchNorm of the model (stem, blocks, head); what they mean and why is in
``ascan_jax.models.blocks``. The module defaults (``tanh``, ``global``) are what the model computed
before they existed, so a caller that does not set them, and its checkpoints, keep their numerics;
the tasks choose for new runs (``config.model.gelu`` / ``config.model.batch_norm``).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import blocks
from ascan_jax.models import layout as layout_lib
from ascan_jax.models import remat as remat_lib
from ascan_jax.models import variants

VARIANTS = variants.VARIANTS


class AsCAN(nn.Module):
  """Hybrid convolution-attention classifier; ``__call__(images, train)`` -> logits."""
  layout: str
  widths: Sequence[int]
  stem_width: int
  num_classes: int
  embed_dim: int = 1280
  head_dim: int = 32
  mlp_ratio: int = 4
  expand_ratio: int = 4
  se_ratio: float = 0.25
  drop_path_rate: float = 0.0
  head_dropout: float = 0.0
  bn_momentum: float = 0.9
  table_image_size: int = 224
  features_only: bool = False
  attention_impl: str = "auto"
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  gelu: str = "tanh"
  batch_norm: str = "global"

  def stages(self) -> tuple[str, ...]:
    return layout_lib.parse_layout(self.layout, num_stages=len(self.widths))

  def stage_grids(self, image_size: int | None = None) -> list[int]:
    """Side of each stage's feature map for square ``image_size`` inputs (default
    ``table_image_size``): the stem and every stage halve it, rounding up like SAME padding."""
    size = self.table_image_size if image_size is None else image_size
    return stage_grids(size, len(self.widths))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, return_features: bool = False,
               return_embedding: bool = False):
    """Logits; with ``return_features`` also the four stage outputs (for dense heads), with
    ``return_embedding`` also the pooled pre-logits embedding (for feature-space metrics).
    With ``features_only`` (a module setting) just the list of stage outputs."""
    stages = self.stages()
    act = lambda y: blocks.gelu(y, self.gelu)
    norm = lambda name: blocks.batch_norm(train, self.bn_momentum, self.dtype, name,
                                          stats=self.batch_norm)
    x = images.astype(self.dtype)
    x = blocks.conv(self.stem_width, 3, 2, dtype=self.dtype, name="stem_conv1")(x)
    x = act(norm("stem_bn1")(x))
    x = blocks.conv(self.stem_width, 3, 1, dtype=self.dtype, name="stem_conv2")(x)
    x = act(norm("stem_bn2")(x))
    x = blocks.constrain(x)

    conv_block = remat_lib.maybe_remat(blocks.ConvBlock, self.remat_policy)
    attn_block = remat_lib.maybe_remat(blocks.TransformerBlock, self.remat_policy)
    total = sum(len(s) for s in stages)
    grids = self.stage_grids()
    block_id = 0
    features = []
    for s, (stage, width) in enumerate(zip(stages, self.widths)):
      grid = grids[s]
      for i, kind in enumerate(stage):
        rate = self.drop_path_rate * block_id / max(1, total - 1)
        name = f"stage{s + 1}_block{i + 1}_{kind}"
        if kind == "C":
          x = conv_block(width, stride=2 if i == 0 else 1, expand_ratio=self.expand_ratio,
                         se_ratio=self.se_ratio, drop_path=rate, bn_momentum=self.bn_momentum,
                         dtype=self.dtype, gelu=self.gelu, batch_norm=self.batch_norm,
                         name=name)(x, train)
        else:
          if i == 0:
            x = blocks.Downsample(width, bn_momentum=self.bn_momentum, dtype=self.dtype,
                                  batch_norm=self.batch_norm,
                                  name=f"stage{s + 1}_downsample")(x, train)
          if width % self.head_dim:
            raise ValueError(f"stage {s + 1} width {width} is not a multiple of head_dim "
                             f"{self.head_dim}")
          x = attn_block(width // self.head_dim, self.head_dim, (grid, grid), self.mlp_ratio,
                         drop_path=rate, attention_impl=self.attention_impl, dtype=self.dtype,
                         gelu=self.gelu, name=name)(x, train)
        block_id += 1
      features.append(x)
    if self.features_only:
      return features

    x = blocks.conv(self.embed_dim, 1, dtype=self.dtype, name="head_conv")(x)
    x = act(norm("head_bn")(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    embedding = x
    x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      name="classifier",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed", "classes")),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("classes",)))(x)
    if return_features and return_embedding:
      return logits, features, embedding
    if return_features:
      return logits, features
    if return_embedding:
      return logits, embedding
    return logits


def stage_grids(image_size: int, num_stages: int = 4) -> list[int]:
  """Feature-map sides of the stages for ``image_size`` inputs: ceil-halved by the stem, then
  by every stage (``stage_grids(240)`` is ``[60, 30, 15, 8]``)."""
  size = -(-int(image_size) // 2)
  out = []
  for _ in range(num_stages):
    size = -(-size // 2)
    out.append(size)
  return out


def parameter_layer_fn(layout: str):
  """``f(path) -> (layer, num_layers)`` for layer-wise learning-rate decay: the stem is layer 0,
  block ``k`` of the backbone (counted over all stages, a stage's downsample with its first block)
  is layer ``k + 1``, anything else (head, classifier, a segmentation decoder) the top layer. The
  path may carry a prefix (``backbone/stage2_block1_C/...``)."""
  stages = layout_lib.parse_layout(layout)
  first = []
  count = 0
  for stage in stages:
    first.append(count)
    count += len(stage)
  num_layers = count + 1
  block = re.compile(r"(?:^|/)stage(\d+)_(?:block(\d+)_[CT]|downsample)(?:/|$)")
  stem = re.compile(r"(?:^|/)stem_")

  def layer(path: str) -> tuple[int, int]:
    m = block.search(path)
    if m:
      s = int(m.group(1)) - 1
      i = int(m.group(2)) - 1 if m.group(2) else 0
      return first[s] + i + 1, num_layers
    if stem.search(path):
      return 0, num_layers
    return num_layers, num_layers

  return layer
