"""A separable 2-D relative position bias that never needs an ``[heads, N, N]`` tensor.

``bias[h, i, j] = row[h, y_i - y_j] + col[h, x_i - x_j]`` for tokens ``i = (y_i, x_i)`` of an
``height x width`` grid (the decomposed form of MViTv2, Li et al. 2022, arXiv 2112.01526, with one
scalar per offset and head instead of a learned embedding). Why it exists: the Swin-style full
table (``attention.RelativePositionBias``) has to be gathered into ``[1, heads, N, N]`` before a
fused kernel can add it, which at N = 4096 (a 64x64 grid, AsCAN-T stage 2 at 512²) is 268 MB per
block and layer, and the TPU flash kernel then wants it per example and writes a dense gradient
of the same size. The separable form instead folds *exactly* into extra query and key features:

  * query ``i`` gets ``[row[h, y_i - 0], ..., row[h, y_i - (height-1)], col[h, x_i - 0], ...]``,
  * key ``j`` gets ``[onehot(y_j, height), onehot(x_j, width)]``,

so ``q'_i . k'_j = q_i . k_j + bias[h, i, j]`` and an unchanged flash kernel computes the biased
attention with ``height + width`` more feature columns and no ``N x N`` tensor at all; the
gradient reaches ``row``/``col`` through the kernel's ``dq``. The XLA path uses ``dense()``,
built by broadcasting two ``[heads, h, h]``/``[heads, w, w]`` Toeplitz matrices, whose backward is
a reduction rather than an ``N²`` scatter-add.

Relation to the full table: a full table ``T[h, dy, dx]`` is separable when
``T = row[dy] + col[dx]``; ``project_table`` gives the least-squares separable approximation
(weighted by how often each offset occurs on the grid, so it minimises the error over the
``N x N`` bias itself), ``table_from_separable`` the other direction (exact). Use it for new
large-grid models, or to start one from a full-table checkpoint via ``project_table``.
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SeparableBias:
  """The per-head row and column offset tables of one ``height x width`` grid.

  ``row``: ``[heads, 2*height-1]`` indexed by ``dy + height - 1``; ``col``: ``[heads, 2*width-1]``
  indexed by ``dx + width - 1``. Passed as the ``bias`` of ``attention.dot_product_attention``.
  """
  row: jax.Array
  col: jax.Array
  height: int = flax.struct.field(pytree_node=False)
  width: int = flax.struct.field(pytree_node=False)

  def check(self, num_heads: int, num_tokens: int) -> None:
    """Raises a ValueError naming the mismatch unless this bias fits ``num_heads`` heads over
    ``num_tokens`` tokens (a pytree dataclass cannot check in ``__init__``: jax rebuilds it with
    placeholder leaves)."""
    expected = (num_heads, 2 * self.height - 1), (num_heads, 2 * self.width - 1)
    if (tuple(self.row.shape), tuple(self.col.shape)) != expected:
      raise ValueError(f"SeparableBias of a {self.height}x{self.width} grid with {num_heads} heads "
                       f"needs row {expected[0]} and col {expected[1]}, got row "
                       f"{tuple(self.row.shape)} and col {tuple(self.col.shape)}")
    if self.num_tokens != num_tokens:
      raise ValueError(f"SeparableBias is for a {self.height}x{self.width} grid "
                       f"({self.num_tokens} tokens) but attention has {num_tokens} tokens")

  @property
  def num_heads(self) -> int:
    return self.row.shape[0]

  @property
  def num_tokens(self) -> int:
    return self.height * self.width

  @property
  def num_features(self) -> int:
    """Extra query/key features the folded form needs: ``height + width``."""
    return self.height + self.width

  def dense(self) -> jax.Array:
    """The ``[1, heads, N, N]`` float32 bias (the XLA path and the reference of the tests)."""
    ty, tx = _toeplitz(self.row, self.height), _toeplitz(self.col, self.width)
    h, w = self.height, self.width
    bias = ty[:, :, None, :, None] + tx[:, None, :, None, :]  # [heads, h, w, h, w]
    return bias.reshape(1, self.num_heads, h * w, h * w).astype(jnp.float32)

  def query_key_features(self) -> tuple[jax.Array, jax.Array]:
    """``(query_features [N, heads, h+w], key_features [N, h+w])`` with
    ``query_features[i, head] . key_features[j] == bias[head, i, j]`` exactly."""
    h, w, heads = self.height, self.width, self.num_heads
    ty = jnp.transpose(_toeplitz(self.row, h), (1, 0, 2))  # [y_i, heads, y_j]
    tx = jnp.transpose(_toeplitz(self.col, w), (1, 0, 2))  # [x_i, heads, x_j]
    q_rows = jnp.broadcast_to(ty[:, None], (h, w, heads, h))
    q_cols = jnp.broadcast_to(tx[None, :], (h, w, heads, w))
    query = jnp.concatenate([q_rows, q_cols], -1).reshape(h * w, heads, h + w)
    ys, xs = np.divmod(np.arange(h * w), w)
    key = np.concatenate([np.eye(h, dtype=np.float32)[ys], np.eye(w, dtype=np.float32)[xs]], -1)
    return query, jnp.asarray(key)


def _toeplitz(offsets: jax.Array, size: int) -> jax.Array:
  """``[heads, size, size]`` with ``[:, a, b] = offsets[:, a - b + size - 1]``."""
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return offsets[:, idx]


def _offset_counts(size: int) -> np.ndarray:
  """How many token pairs of a ``size``-long axis have offset ``d`` (``size - |d|``)."""
  return size - np.abs(np.arange(-(size - 1), size))


def project_table(table: jax.Array, height: int, width: int) -> SeparableBias:
  """Least-squares separable approximation of a full ``[heads, 2h-1, 2w-1]`` table.

  Minimises ``sum_{i,j} (full_bias[h,i,j] - separable_bias[h,i,j])^2`` over all token pairs of the
  grid. Each offset ``(dy, dx)`` occurs ``(height-|dy|) * (width-|dx|)`` times; with these product
  weights the normal equations have the closed form of a weighted two-way mean decomposition:
  ``row[dy]`` = the weighted mean of ``T[dy, :]``, ``col[dx]`` = the weighted mean of
  ``T[:, dx]`` minus the weighted grand mean. Resize the table to the grid first
  (``attention.resize_relative_position_table``) if it was trained on another one.
  """
  expected = (2 * height - 1, 2 * width - 1)
  if tuple(table.shape[1:]) != expected or table.ndim != 3:
    raise ValueError(f"relative position table {table.shape} is not [heads, {expected[0]}, "
                     f"{expected[1]}] for a {height}x{width} grid; resize it first")
  wy = jnp.asarray(_offset_counts(height) / _offset_counts(height).sum(), jnp.float32)
  wx = jnp.asarray(_offset_counts(width) / _offset_counts(width).sum(), jnp.float32)
  table = table.astype(jnp.float32)
  row = jnp.einsum("hyx,x->hy", table, wx)
  col_means = jnp.einsum("hyx,y->hx", table, wy)
  grand = jnp.einsum("hy,y->h", row, wy)
  return SeparableBias(row, col_means - grand[:, None], height, width)


def table_from_separable(bias: SeparableBias) -> jax.Array:
  """The full ``[heads, 2h-1, 2w-1]`` table that gives the same bias (``row[dy] + col[dx]``)."""
  return bias.row[:, :, None] + bias.col[:, None, :]


def _resize_offsets(offsets: jax.Array, size: int) -> jax.Array:
  """``[heads, 2s'-1]`` resized linearly to ``[heads, 2*size-1]``; offset 0 stays at the centre
  (half-pixel centres), as ``attention.resize_relative_position_table`` does in 2-D."""
  target = (offsets.shape[0], 2 * size - 1)
  if tuple(offsets.shape) == target:
    return offsets
  return jax.image.resize(offsets, target, "linear")


class SeparableRelativePositionBias(nn.Module):
  """Learned separable relative position bias: parameters ``row [heads, 2gh-1]`` and
  ``col [heads, 2gw-1]`` for the training grid ``train_grid = (gh, gw)``; at another grid they are
  resized linearly. Returns a ``SeparableBias`` for ``attention.dot_product_attention``.
  """
  num_heads: int
  train_grid: tuple[int, int]

  @nn.compact
  def __call__(self, height: int, width: int) -> SeparableBias:
    gh, gw = self.train_grid
    init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("heads", None))
    row = self.param("row", init, (self.num_heads, 2 * gh - 1), jnp.float32)
    col = self.param("col", init, (self.num_heads, 2 * gw - 1), jnp.float32)
    return SeparableBias(_resize_offsets(row, height), _resize_offsets(col, width), height, width)
