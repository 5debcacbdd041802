"""The attention function: implementations agree with ``xla`` (values and gradients), the Pallas
path builds no N x N tensor without a dense bias, tensor parallelism splits whole heads; relative
position bias, RoPE, masks and the attention modules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from ascan_jax.models import attention, pallas_flash, separable_bias
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


# --- Pallas TPU flash kernel (run by Pallas' TPU interpreter on CPU) ----------------------------

def _bias_of_kind(kind, h, height, width, key):
  """None, a dense [1, H, N, N] bias, or a SeparableBias of a height x width grid."""
  if kind == "none":
    return None
  ka, kb = jax.random.split(jax.random.key(key))
  n = height * width
  if kind == "dense":
    return jax.random.normal(ka, (1, h, n, n))
  return separable_bias.SeparableBias(jax.random.normal(ka, (h, 2 * height - 1)),
                                      jax.random.normal(kb, (h, 2 * width - 1)), height, width)


def _value_and_grads(attend, args, cotangent):
  """``attend(*args)`` and the VJP at ``cotangent`` for every argument (q, k, v and the bias, if
  any), in one jitted function: a single compile of the interpreted kernels per case."""
  def run(*args):
    out, vjp = jax.vjp(attend, *args)
    return out, vjp(cotangent)
  return jax.jit(run)(*args)


def _assert_same_values_and_grads(got, want, names):
  np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
  got_grads, want_grads = jax.tree.leaves(got[1]), jax.tree.leaves(want[1])
  assert len(got_grads) == len(want_grads) == len(names)
  for name, g, w in zip(names, got_grads, want_grads):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4, err_msg=name)


def _grad_names(kind):
  return {"none": ["dq", "dk", "dv"], "dense": ["dq", "dk", "dv", "dbias"],
          "separable": ["dq", "dk", "dv", "dbias.row", "dbias.col"]}[kind]


def _args(q, k, v, bias):
  return (q, k, v) if bias is None else (q, k, v, bias)


# (bias kind, grid, head dim). 15x20 = 300 tokens: padded to 384 (segment ids), three 128-token
# blocks (the multi-step kernels). Head dim 96 + 15 + 20 separable features = 131 is zero-padded
# to 256 (the kernel's head-dim rule). The unpadded single-block case runs under a mesh below.
@pytest.mark.parametrize("kind,d", [("none", 16), ("dense", 16), ("separable", 96)])
def test_pallas_kernel_matches_xla_forward_and_gradients(kind, d):
  """Outputs and the gradients of q, k, v and of the bias (dense ``ab`` or row/col tables)."""
  import jax.experimental.pallas.tpu as pltpu
  grid, h = (15, 20), 2
  q, k, v, _ = _qkv(1, grid[0] * grid[1], h, d, key=d)
  args = _args(q, k, v, _bias_of_kind(kind, h, *grid, key=d))
  cotangent = jax.random.normal(jax.random.key(99), q.shape)
  want = _value_and_grads(
      lambda q, k, v, b=None: attention.dot_product_attention(q, k, v, b, implementation="xla"),
      args, cotangent)
  with pltpu.force_tpu_interpret_mode():
    got = _value_and_grads(
        lambda q, k, v, b=None: pallas_flash.flash_attention(q, k, v, b, d ** -0.5),
        args, cotangent)
  _assert_same_values_and_grads(got, want, _grad_names(kind))
  if kind != "none":  # the bias gradient is not trivially small.
    assert float(jnp.abs(jax.tree.leaves(want[1])[3]).max()) > 1e-2


def _mesh(data, tensor):
  """A (data, tensor) mesh over the first data*tensor fake CPU devices, with the rules that
  matter here (batch over data, heads over tensor)."""
  mesh = jax.make_mesh((data, tensor), ("data", "tensor"), devices=jax.devices()[:data * tensor],
                       axis_types=(AxisType.Auto,) * 2)
  return mesh, (("batch", "data"), ("heads", "tensor"), ("embed", None))


@pytest.mark.parametrize("kind", ["none", "dense", "separable"])
def test_pallas_under_a_mesh_runs_per_shard_forward_and_backward(kind):
  """shard_map over a (data=2, tensor=2) mesh: batch and heads split, bias split with the heads.
  8x16 = 128 tokens: no padding, one block per shard."""
  import jax.experimental.pallas.tpu as pltpu
  mesh, rules = _mesh(2, 2)
  q, k, v, _ = _qkv(2, 128, 2, 16, key=3)
  args = _args(q, k, v, _bias_of_kind(kind, 2, 8, 16, key=4))
  cotangent = jax.random.normal(jax.random.key(5), q.shape)

  def attend(impl):
    def f(q, k, v, b=None):
      with sharding_lib.in_mesh(mesh, rules):
        return attention.dot_product_attention(q, k, v, b, implementation=impl)
    return f

  want = _value_and_grads(attend("xla"), args, cotangent)
  sharded = jax.sharding.NamedSharding(mesh, P("data", None, "tensor", None))
  args = tuple(jax.device_put(t, sharded) for t in args[:3]) + args[3:]
  with pltpu.force_tpu_interpret_mode():
    got = _value_and_grads(attend("pallas"), args, cotangent)
  _assert_same_values_and_grads(got, want, _grad_names(kind))


def _n_by_n_arrays_around_the_kernel(bias, n=300, b=2, h=2, d=32):
  """Shapes of arrays with two dims >= n in forward + backward of the Pallas path, as lowered
  for TPU (not compiled: the Mosaic kernels are opaque custom calls, so these are exactly the
  arrays the wrapper materialises in HBM around them)."""
  import re
  q, k, v, _ = _qkv(b, n, h, d)
  args = (q, k, v) if bias is None else (q, k, v, bias)

  def loss(*a):
    return pallas_flash.flash_attention(*a[:3], a[3] if len(a) > 3 else None, d ** -0.5).sum()

  text = jax.jit(jax.grad(loss, tuple(range(len(args))))).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
  shapes = {tuple(int(x) for x in dims.strip("x").split("x"))
            for dims in re.findall(r"tensor<((?:\d+x)+)(?:f32|bf16|f16)>", text)}
  return {s for s in shapes if sum(dim >= n for dim in s) >= 2}


def test_no_bias_and_separable_bias_pallas_paths_build_no_n_by_n_tensor():
  """The defect of a dense zero ``ab`` (and its ``dab``) for bias-free attention cannot return."""
  assert _n_by_n_arrays_around_the_kernel(None) == set()
  sep = _bias_of_kind("separable", 2, 15, 20, key=0)
  assert _n_by_n_arrays_around_the_kernel(sep) == set()
  # The detector itself: a dense bias is (and must be) broadcast to [B, H, N_pad, N_pad].
  dense = _bias_of_kind("dense", 2, 15, 20, key=0)
  assert (2, 2, 384, 384) in _n_by_n_arrays_around_the_kernel(dense)


def test_block_sizes_rule():
  for n_pad in (128, 256, 384, 640, 768, 1024, 3200, 4096, 16384):
    for head_dim in (32, 64, 128, 256):
      bs = pallas_flash.block_sizes_for(n_pad, head_dim)
      block = bs.block_q
      fitting = [c for c in (512, 256, 128) if n_pad % c == 0 and (head_dim <= 128 or c <= 256)]
      assert block == max(fitting), (n_pad, head_dim)
      assert bs.has_backward_blocks
      for size in (bs.block_k_major, bs.block_k, bs.block_q_major_dkv, bs.block_k_major_dkv,
                   bs.block_q_dkv, bs.block_k_dkv, bs.block_q_dq):
        assert size == block
      assert bs.block_k_major_dq == bs.block_k_dq == 128  # keeps the kernel's di broadcast small
  assert pallas_flash.padded_length(300) == 384 and pallas_flash.padded_length(256) == 256
  assert [pallas_flash.kernel_head_dim(d) for d in (32, 128, 131, 256)] == [32, 128, 256, 256]
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas_flash.block_sizes_for(300, 64)


# --- Tensor parallelism: whole heads --------------------------------------------------------------

def test_heads_spec_splits_whole_heads_or_replicates():
  mesh, rules = _mesh(2, 4)
  with sharding_lib.in_mesh(mesh, rules):
    assert attention.heads_spec((2, 24, 4, 8)) == P("data", None, "tensor", None)
    # 2 heads x 8 = 16 columns divide by 4, but 2 heads do not: heads replicated, never split.
    assert attention.heads_spec((2, 24, 2, 8)) == P("data", None, None, None)
  assert attention.heads_spec((2, 24, 2, 8)) is None  # no mesh: no constraint


def _collectives_with_n_by_n_operands(num_heads, n_tokens=24):
  import re
  mesh, rules = _mesh(2, 4)
  m = attention.MultiHeadSelfAttention(num_heads, 16 // num_heads, (4, 6), "xla",
                                       position="none")
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 16))
  boxed = jax.eval_shape(m.init, jax.random.key(0), x)
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  variables = jax.jit(lambda: nn.unbox(m.init(jax.random.key(0), x)), out_shardings=shardings)()

  def apply(variables, x):
    with sharding_lib.in_mesh(mesh, rules):
      return m.apply(variables, x)

  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    compiled = jax.jit(apply).lower(variables, x).compile()
    out = compiled(variables, x)
  np.testing.assert_allclose(out, jax.jit(m.apply)(variables, np.asarray(x)), atol=1e-5)
  pattern = r"= \w+\[([\d,]+)\][^ ]* (?:all-reduce|all-gather|reduce-scatter|all-to-all)\("
  found = [tuple(int(d) for d in dims.split(","))
           for dims in re.findall(pattern, compiled.as_text())]
  return [s for s in found if list(s).count(n_tokens) >= 2]


@pytest.mark.parametrize("num_heads", [2, 4])  # tensor=4 does not / does divide the heads.
def test_tensor_parallel_attention_never_reduces_logits_over_a_split_head(num_heads):
  """With the fused ``heads*head_dim`` kernel split 4 ways, 2 heads would be cut in half and
  ``q.k`` summed over devices (an all-reduce of the [N, N] logits); whole heads avoid it."""
  assert _collectives_with_n_by_n_operands(num_heads) == []


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
    return set(jax.eval_shape(m.init, jax.random.key(0), x)["params"])

  assert params() == {"query", "key", "value", "out", "rel_pos"}  # the classifier's, unchanged
  assert params(position="rope", qk_norm=True) == {"query", "key", "value", "out", "query_norm",
                                                   "key_norm"}
  assert params(position="none") == {"query", "key", "value", "out"}
  assert params(position="relative_bias_separable") == {"query", "key", "value", "out",
                                                         "rel_pos_separable"}
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
