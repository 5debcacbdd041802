"""The attention function: implementations agree with ``xla``; relative position bias."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ascan_jax.models import attention
from ascan_jax.parallel import sharding as sharding_lib


def _qkv(b, n, h, d, key=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(key), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, d), dtype) for kk in ks[:3])
  bias = jax.random.normal(ks[3], (1, h, n, n), jnp.float32)
  return q, k, v, bias


def _naive(q, k, v, bias):
  """Plain numpy attention, independent of the code under test."""
  q, k, v, bias = (np.asarray(x, np.float64) for x in (q, k, v, bias))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_xla_matches_naive_reference():
  q, k, v, bias = _qkv(2, 49, 3, 16)
  out = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  np.testing.assert_allclose(out, _naive(q, k, v, bias), atol=2e-5)


def test_auto_is_xla_on_cpu_and_unknown_name_is_rejected():
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "cpu") == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "gpu") == "cudnn"
  assert attention.resolve_implementation("auto", jnp.float32, 4096, 64, "gpu") == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "tpu") == "pallas"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 196, 64, "tpu") == "xla"
  with pytest.raises(ValueError, match="not one of"):
    attention.resolve_implementation("flash", jnp.float32, 16, 16, "cpu")
  with pytest.raises(ValueError, match="cudnn"):
    attention.resolve_implementation("cudnn", jnp.float32, 16, 16, "cpu")


@pytest.mark.parametrize("n", [49, 196])  # not multiples of the kernel block: padded and masked.
def test_pallas_tpu_kernel_matches_xla_in_interpret_mode(n):
  """The TPU flash kernel, run by Pallas' TPU interpreter on CPU, against ``xla``."""
  import jax.experimental.pallas.tpu as pltpu
  q, k, v, bias = _qkv(2, n, 2, 32, key=n)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  with pltpu.force_tpu_interpret_mode():
    out = attention._pallas_attention(q, k, v, bias, q.shape[-1] ** -0.5)
    grad = jax.grad(lambda q: attention._pallas_attention(q, k, v, bias, 32 ** -0.5).sum())(q)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  ref_grad = jax.grad(lambda q: attention.dot_product_attention(
      q, k, v, bias, implementation="xla").sum())(q)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_pallas_under_a_mesh_runs_per_shard():
  import jax.experimental.pallas.tpu as pltpu
  from ascan_jax import config_defaults
  from ascan_jax.parallel import mesh as mesh_lib
  c = config_defaults.classification()
  c.mesh.shape = (4, 1, 2)
  mesh = mesh_lib.make_mesh(c)
  rules = mesh_lib.rules(c)
  q, k, v, bias = _qkv(4, 49, 2, 32, key=3)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")

  def f(q, k, v, bias):
    with sharding_lib.in_mesh(mesh, rules):
      return attention._pallas_attention_sharded(q, k, v, bias, 32 ** -0.5)

  with pltpu.force_tpu_interpret_mode():
    sharding = jax.sharding.NamedSharding(mesh, P("data", None, "tensor", None))
    out = jax.jit(f)(*(jax.device_put(t, sharding) for t in (q, k, v)), bias)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_in_bf16():
  q, k, v, bias = _qkv(4, 784, 4, 32, dtype=jnp.bfloat16)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  out = attention.dot_product_attention(q, k, v, bias, implementation="cudnn")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_relative_position_bias_lookup_and_resize():
  module = attention.RelativePositionBias(num_heads=2, train_grid=(3, 4))
  variables = nn.unbox(module.init(jax.random.key(0), 3, 4))
  table = np.asarray(variables["params"]["table"])
  bias = np.asarray(module.apply(variables, 3, 4))
  assert bias.shape == (1, 2, 12, 12)
  # Token (0, 0) vs token (2, 3): offset (-2, -3) -> table index (0, 0).
  np.testing.assert_array_equal(bias[0, :, 0, 11], table[:, 0, 0])
  # Same offset, same bias (translation invariance): (1, 1)->(0, 0) and (2, 2)->(1, 1).
  np.testing.assert_array_equal(bias[0, :, 5, 0], bias[0, :, 10, 5])
  other = module.apply(variables, 5, 6)
  assert other.shape == (1, 2, 30, 30)
  assert np.all(np.isfinite(other))


def test_relative_position_index_is_shifted_offsets():
  idx = attention.relative_position_index(2, 3)
  assert idx.shape == (6, 6, 2)
  assert idx.min() == 0 and idx[..., 0].max() == 2 and idx[..., 1].max() == 4


# --- UNet extensions: masks and cross-attention lengths, 2-D RoPE, QK RMSNorm -------------------

from ascan_jax.models import rope  # noqa: E402


def _naive_masked(q, k, v, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_cross_length_attention_with_key_mask_matches_naive():
  ks = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(ks[0], (2, 12, 2, 8))
  k = jax.random.normal(ks[1], (2, 5, 2, 8))
  v = jax.random.normal(ks[2], (2, 5, 2, 8))
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], bool)
  out = attention.dot_product_attention(q, k, v, key_mask=jnp.asarray(mask),
                                        implementation="xla")
  np.testing.assert_allclose(out, _naive_masked(q, k, v, mask), atol=2e-5)
  # No mask, different lengths: plain softmax over all 5 keys.
  out = attention.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(out, _naive_masked(q, k, v, np.ones((2, 5), bool)), atol=2e-5)


def test_fully_masked_query_gets_zero_and_pallas_falls_back_to_xla_with_mask():
  q, k, v, _ = _qkv(2, 6, 2, 8, key=11)
  mask = jnp.array([[True] * 6, [False] * 6])
  ref = attention.dot_product_attention(q, k, v, key_mask=mask, implementation="xla")
  np.testing.assert_array_equal(ref[1], 0.0)
  # 'pallas' with a mask (and with unequal lengths) runs the xla path, also on CPU.
  out = attention.dot_product_attention(q, k, v, key_mask=mask, implementation="pallas")
  np.testing.assert_array_equal(out, ref)
  out = attention.dot_product_attention(q, k[:, :4], v[:, :4], implementation="pallas")
  np.testing.assert_allclose(out, attention.dot_product_attention(
      q, k[:, :4], v[:, :4], implementation="xla"), atol=1e-6)
  with pytest.raises(ValueError, match="key_mask"):
    attention.dot_product_attention(q, k, v, key_mask=mask[:, :3], implementation="xla")


def test_rope_is_a_rotation_that_preserves_norms():
  x = jax.random.normal(jax.random.key(0), (2, 12, 3, 16))
  y = rope.apply_rope_2d(x, 3, 4)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  # Position (0, 0) is not rotated; other positions are.
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
  assert not np.allclose(y[:, 5], x[:, 5])
  # bf16 in, bf16 out.
  assert rope.apply_rope_2d(x.astype(jnp.bfloat16), 3, 4).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_the_2d_offset():
  """q_i . k_j after RoPE depends on (y_i - y_j, x_i - x_j), not on the absolute positions."""
  h, w, d = 5, 6, 16
  kq, kk = jax.random.split(jax.random.key(1))
  q0 = jax.random.normal(kq, (1, 1, 1, d))
  k0 = jax.random.normal(kk, (1, 1, 1, d))
  # The same query / key vector at every position, then rotated by its position.
  q = rope.apply_rope_2d(jnp.broadcast_to(q0, (1, h * w, 1, d)), h, w)[0, :, 0]
  k = rope.apply_rope_2d(jnp.broadcast_to(k0, (1, h * w, 1, d)), h, w)[0, :, 0]
  scores = np.asarray(q @ k.T)
  idx = lambda y, x: y * w + x  # noqa: E731
  for dy, dx in [(0, 0), (1, 2), (-2, 1), (3, -4)]:
    vals = [scores[idx(y + dy, x + dx), idx(y, x)]
            for y in range(h) for x in range(w)
            if 0 <= y + dy < h and 0 <= x + dx < w]
    np.testing.assert_allclose(vals, vals[0], rtol=1e-4, atol=1e-4)
  # Different offsets give different scores (the encoding is not trivial) ...
  assert abs(scores[idx(0, 1), 0] - scores[idx(1, 0), 0]) > 1e-3
  # ... and rows and columns are encoded by separate halves of the head dim.
  cos, _ = rope.rope_2d_angles(h, w, d)
  assert np.allclose(cos[idx(0, 3), : d // 4], 1.0) and np.allclose(cos[idx(3, 0), d // 4:], 1.0)
  with pytest.raises(ValueError, match="divisible by 4"):
    rope.rope_2d_angles(2, 2, 6)


def test_qk_rms_norm_normalises_each_head():
  x = 7.0 * jax.random.normal(jax.random.key(2), (2, 5, 3, 8)) + 2.0
  module = rope.qk_rms_norm(jnp.float32, "q_norm")
  variables = nn.unbox(module.init(jax.random.key(0), x))
  assert variables["params"]["scale"].shape == (8,)
  y = module.apply(variables, x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1.0, rtol=1e-4)


def test_self_attention_parameters_per_position_option():
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))

  def params(**kw):
    m = attention.MultiHeadSelfAttention(2, 8, (4, 4), "xla", **kw)
    return set(nn.unbox(m.init(jax.random.key(0), x))["params"])

  assert params() == {"query", "key", "value", "out", "rel_pos"}  # the classifier's, unchanged
  assert params(position="rope", qk_norm=True) == {"query", "key", "value", "out", "query_norm",
                                                   "key_norm"}
  assert params(position="none") == {"query", "key", "value", "out"}
  with pytest.raises(ValueError, match="position"):
    params(position="sinusoidal")


def test_rope_self_attention_on_a_non_square_map_of_equal_tokens_gives_equal_outputs():
  """RoPE changes only the attention weights: equal tokens (equal values) still give equal
  outputs at every position of a 5x7 map (which the RoPE grid must match)."""
  m = attention.MultiHeadSelfAttention(2, 8, (1, 1), "xla", position="rope", qk_norm=True)
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(4), (1, 1, 1, 16)), (1, 5, 7, 16))
  variables = m.init(jax.random.key(0), x)
  y = m.apply(variables, x)
  # All tokens equal => values equal => any convex combination is the same vector.
  np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1, :1], y.shape), atol=1e-5)


def test_cross_attention_ignores_masked_context_tokens():
  m = attention.MultiHeadCrossAttention(2, 8, "xla", qk_norm=True)
  x = jax.random.normal(jax.random.key(5), (2, 3, 3, 16))
  ctx = jax.random.normal(jax.random.key(6), (2, 4, 24))
  mask = jnp.array([[True, True, False, False], [False, False, False, False]])
  variables = nn.unbox(m.init(jax.random.key(0), x, ctx, mask))
  assert variables["params"]["key"]["kernel"].shape == (24, 16)  # context width -> heads
  y = m.apply(variables, x, ctx, mask)
  ctx2 = ctx.at[:, 2:].set(100.0)  # change only masked tokens
  np.testing.assert_allclose(m.apply(variables, x, ctx2, mask), y, atol=1e-6)
  assert not np.allclose(m.apply(variables, x, ctx2.at[0, 0].set(3.0), mask)[0], y[0])
  np.testing.assert_array_equal(y[1], 0.0)  # no valid token: no contribution (zero out bias)
