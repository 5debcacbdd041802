"""The separable relative position bias: its dense form, its exact folding into query/key
features, the least-squares projection of a full table, and agreement with the full-table module
(``attention.RelativePositionBias``) when the table is separable, at the training grid and after
resizing to another one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.models import attention
from ascan_jax.models import separable_bias as sb


def _random_bias(heads=2, height=3, width=4, key=0):
  kr, kc = jax.random.split(jax.random.key(key))
  return sb.SeparableBias(jax.random.normal(kr, (heads, 2 * height - 1)),
                          jax.random.normal(kc, (heads, 2 * width - 1)), height, width)


def _naive_dense(row, col, height, width):
  """bias[h, i, j] = row[h, y_i - y_j + H - 1] + col[h, x_i - x_j + W - 1], with loops."""
  row, col = np.asarray(row), np.asarray(col)
  n = height * width
  out = np.zeros((row.shape[0], n, n))
  for i in range(n):
    for j in range(n):
      (yi, xi), (yj, xj) = divmod(i, width), divmod(j, width)
      out[:, i, j] = row[:, yi - yj + height - 1] + col[:, xi - xj + width - 1]
  return out


def test_dense_form_matches_the_definition():
  bias = _random_bias()
  np.testing.assert_allclose(bias.dense()[0], _naive_dense(bias.row, bias.col, 3, 4), atol=1e-6)


def test_query_key_features_reproduce_the_bias_exactly():
  bias = _random_bias(height=5, width=3)
  qf, kf = bias.query_key_features()
  assert qf.shape == (15, 2, 8) and kf.shape == (15, 8)
  folded = jnp.einsum("ihf,jf->hij", qf, kf)
  np.testing.assert_allclose(folded, bias.dense()[0], atol=1e-6)


def test_projection_of_a_full_table_is_the_least_squares_fit_over_all_token_pairs():
  height, width, heads = 3, 4, 2
  table = jax.random.normal(jax.random.key(1), (heads, 2 * height - 1, 2 * width - 1))
  proj = sb.project_table(table, height, width)
  # Independent reference: least squares over the N x N pairs with a design matrix of one-hot
  # row-offset and column-offset indicators.
  idx = attention.relative_position_index(height, width).reshape(-1, 2)
  design = np.concatenate([np.eye(2 * height - 1)[idx[:, 0]], np.eye(2 * width - 1)[idx[:, 1]]],
                          1)
  full = np.asarray(table)[:, idx[:, 0], idx[:, 1]]  # [heads, N*N]
  for h in range(heads):
    coef, *_ = np.linalg.lstsq(design, full[h], rcond=None)
    np.testing.assert_allclose(np.asarray(proj.dense()[0, h]).reshape(-1), design @ coef,
                               atol=1e-5)
  # A separable table is reproduced exactly (the dense bias; the constant split may differ).
  exact = _random_bias(heads, height, width, key=2)
  again = sb.project_table(sb.table_from_separable(exact), height, width)
  np.testing.assert_allclose(again.dense(), exact.dense(), atol=1e-5)
  with pytest.raises(ValueError, match="resize it first"):
    sb.project_table(table, height + 1, width)


@pytest.mark.parametrize("grid", [(3, 4), (5, 7)])  # the training grid, and a resized one.
def test_module_agrees_with_the_full_table_module_on_a_separable_table(grid):
  """Bilinear resizing of a separable table equals linear resizing of its row and column."""
  module = sb.SeparableRelativePositionBias(num_heads=2, train_grid=(3, 4))
  variables = nn.unbox(module.init(jax.random.key(0), 3, 4))
  assert set(variables["params"]) == {"row", "col"}
  assert variables["params"]["row"].shape == (2, 5) and variables["params"]["col"].shape == (2, 7)
  full = attention.RelativePositionBias(num_heads=2, train_grid=(3, 4))
  table = sb.table_from_separable(sb.SeparableBias(variables["params"]["row"],
                                                   variables["params"]["col"], 3, 4))
  want = full.apply({"params": {"table": table}}, *grid)
  got = module.apply(variables, *grid)
  assert (got.height, got.width) == grid
  np.testing.assert_allclose(got.dense(), want, atol=1e-5)


def test_self_attention_module_with_separable_bias_depends_on_its_parameters():
  m = attention.MultiHeadSelfAttention(2, 8, (6, 6), "xla", position="relative_bias_separable")
  x = jax.random.normal(jax.random.key(3), (1, 6, 6, 16))
  variables = nn.unbox(m.init(jax.random.key(0), x))
  y = m.apply(variables, x)
  params = variables["params"]
  tables = params["rel_pos_separable"]
  bumped = {"row": tables["row"] + (jnp.arange(11) > 5), "col": tables["col"]}  # favour dy > 0
  changed = m.apply({"params": {**params, "rel_pos_separable": bumped}}, x)
  assert not np.allclose(changed, y, atol=1e-4)


def test_mismatched_bias_gets_a_clear_error():
  bias = _random_bias(heads=2, height=3, width=4)
  q = jnp.zeros((1, 12, 3, 8))  # 3 heads, the bias has 2
  with pytest.raises(ValueError, match="2 heads|3 heads"):
    attention.dot_product_attention(q, q, q, bias, implementation="xla")
  q = jnp.zeros((1, 10, 2, 8))  # 10 tokens, the grid has 12
  with pytest.raises(ValueError, match="12 tokens"):
    attention.dot_product_attention(q, q, q, bias, implementation="xla")
  with pytest.raises(ValueError, match="self-attention"):
    attention.dot_product_attention(jnp.zeros((1, 12, 2, 8)), q, q, bias, implementation="xla")
