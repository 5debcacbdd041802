"""AsCAN UNet: shapes at several resolutions, variant sizes, conditioning, dtypes, blocks."""
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.models import ascan
from ascan_jax.models import blocks
from ascan_jax.models import conditioning
from ascan_jax.models import unet
from ascan_jax.models import unet_variants
from ascan_jax.models import variants
from tests.test_models import PINNED_PARAMS as CLASSIFIER_PINNED_PARAMS

# Pinned parameter counts. A change here is an architecture change.
PINNED_PARAMS = {"imagenet": 393_517_364, "t2i": 1_851_039_556, "tiny": 1_802_036}
TINY_CTX = unet_variants.VARIANTS["tiny"]["context_dim"]


def _tiny(**kw):
  return unet.from_variant("tiny", attention_impl="xla", **kw)


_JITTED = {}


def _apply(model, variables, x, t, ctx, mask=None, train=False, rngs=None):
  """``model.apply`` jitted once per (model, train), so equal shapes reuse one compilation."""
  key = (repr(model), train)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda v, x, t, c, m, r: model.apply(v, x, t, c, m, train=train,
                                                               rngs=r))
  return _JITTED[key](variables, x, t, ctx, mask, rngs)


def _inputs(b=2, h=16, w=16, length=1, key=0):
  ks = jax.random.split(jax.random.key(key), 2)
  x = jax.random.normal(ks[0], (b, h, w, 4))
  ctx = jax.random.normal(ks[1], (b, length, TINY_CTX))
  t = jnp.linspace(10.0, 900.0, b)
  return x, t, ctx


@pytest.fixture(scope="module")
def tiny_variables():
  """Initialised tiny params, and a copy whose zero output conv is made random (so the output
  depends on the rest of the network)."""
  x, t, ctx = _inputs()
  variables = nn.unbox(jax.jit(_tiny().init)(jax.random.key(0), x, t, ctx))
  params = flax.core.unfreeze(variables["params"])
  kernel = params["conv_out"]["kernel"]
  params["conv_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(9), kernel.shape)
  return variables, {"params": params}


def _count(variables):
  return sum(int(x.size) for x in jax.tree.leaves(variables["params"]))


def test_zero_initialised_output_conv_gives_zero_eps_at_init(tiny_variables):
  init, _ = tiny_variables
  x, t, ctx = _inputs()
  out = _apply(_tiny(), init, x, t, ctx)
  chex.assert_shape(out, (2, 16, 16, 4))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)
  assert set(init) == {"params"}  # GroupNorm: no batch statistics in the UNet.
  assert _count(init) == PINNED_PARAMS["tiny"]


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (24, 32)])
def test_tiny_output_shapes_at_several_resolutions(tiny_variables, hw):
  _, variables = tiny_variables
  x, t, ctx = _inputs(h=hw[0], w=hw[1])
  out = _apply(_tiny(), variables, x, t, ctx)
  chex.assert_shape(out, (2, *hw, 4))
  chex.assert_tree_all_finite(out)
  assert float(jnp.std(out)) > 0


def test_sizes_not_divisible_by_the_downsample_factor_are_rejected(tiny_variables):
  _, variables = tiny_variables
  x, t, ctx = _inputs(h=10, w=16)
  with pytest.raises(ValueError, match="divisible by 4"):
    _tiny().apply(variables, x, t, ctx)
  x, t, _ = _inputs()
  with pytest.raises(ValueError, match="context_dim"):
    _tiny().apply(variables, x, t, jnp.zeros((2, 1, TINY_CTX + 1)))


def test_timestep_changes_the_output(tiny_variables):
  _, variables = tiny_variables
  x, _, ctx = _inputs()
  a = _apply(_tiny(), variables, x, jnp.array([10.0, 10.0]), ctx)
  b = _apply(_tiny(), variables, x, jnp.array([900.0, 900.0]), ctx)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_same_unet_takes_class_tokens_or_masked_text_context(tiny_variables):
  """The UNet does not know what the context is: one class token, or 7 text-like tokens with a
  padding mask, through the same parameters."""
  _, variables = tiny_variables
  model = _tiny()
  x, t, _ = _inputs()
  cond = conditioning.ClassConditioner(num_classes=10, context_dim=TINY_CTX)
  labels = jnp.array([3, cond.null_label])
  cvars = cond.init(jax.random.key(1), labels)
  class_ctx = cond.apply(cvars, labels)
  chex.assert_shape(class_ctx, (2, 1, TINY_CTX))
  out_class = _apply(model, variables, x, t, class_ctx)
  chex.assert_tree_all_finite(out_class)

  text = jax.random.normal(jax.random.key(2), (2, 7, TINY_CTX))
  mask = jnp.array([[True] * 7, [True] * 3 + [False] * 4])
  out_text = _apply(model, variables, x, t, text, mask)
  chex.assert_shape(out_text, (2, 16, 16, 4))
  # Padding tokens do not matter; real tokens do.
  padded = text.at[1, 3:].set(50.0)
  np.testing.assert_allclose(_apply(model, variables, x, t, padded, mask), out_text,
                             atol=1e-5)
  changed = _apply(model, variables, x, t, text.at[1, 0].set(5.0), mask)
  assert not np.allclose(changed[1], out_text[1], atol=1e-4)


def test_class_conditioner_has_a_null_class():
  cond = conditioning.ClassConditioner(num_classes=5, context_dim=12, n_tokens=2)
  labels = jnp.array([0, 4, 5])
  variables = nn.unbox(cond.init(jax.random.key(0), labels))
  assert variables["params"]["embedding"].shape == (6, 24)
  ctx = cond.apply(variables, labels)
  chex.assert_shape(ctx, (3, 2, 12))
  assert cond.null_label == 5
  assert not np.allclose(ctx[1], ctx[2])


def test_bf16_compute_keeps_float32_params_and_output(tiny_variables):
  init, variables = tiny_variables
  model = _tiny(dtype=jnp.bfloat16)
  x, t, ctx = _inputs()
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)
  assert {a.dtype for a in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  chex.assert_trees_all_equal_shapes(nn.unbox(abstract), init)
  out = _apply(model, variables, x, t, ctx)
  assert out.dtype == jnp.float32
  ref = _apply(_tiny(), variables, x, t, ctx)
  chex.assert_tree_all_finite(out)
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert err < 0.05, err


def test_remat_gives_the_same_gradients_and_drop_path_is_random_in_training():
  def micro(**kw):  # few blocks of both kinds: quick to compile.
    return unet.AsCANUNet(channels=(16, 16, 16), down_layout="C-C-T", mid_layout="T",
                          head_dim=8, context_dim=8, norm_groups=4, attention_impl="xla", **kw)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t = jnp.array([3.0, 700.0])
  ctx = jax.random.normal(jax.random.key(1), (2, 2, 8))
  mask = jnp.array([[True, False], [True, True]])
  # Random parameters from numpy (compiling the real initialiser would double the test time).
  rng = np.random.default_rng(0)
  shapes = nn.unbox(jax.eval_shape(micro().init, jax.random.key(2), x, t, ctx, mask))["params"]
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                        shapes)

  def grads(model):
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx, mask) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  chex.assert_trees_all_close(grads(micro(remat_policy="full")), grads(micro()),
                              atol=1e-5, rtol=1e-4)
  model = micro(drop_path_rate=0.5)
  a, b = (_apply(model, {"params": params}, x, t, ctx, mask, train=True,
                 rngs={"dropout": jax.random.key(k)}) for k in (4, 5))
  assert not np.allclose(a, b)
  c = _apply(model, {"params": params}, x, t, ctx, mask, train=False, rngs={})
  d = _apply(micro(), {"params": params}, x, t, ctx, mask, train=False, rngs={})
  np.testing.assert_allclose(c, d, atol=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_variant_shapes_and_pinned_size(size):
  model = unet.from_variant("imagenet", attention_impl="xla")
  x = jax.ShapeDtypeStruct((2, size, size, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  ctx = jax.ShapeDtypeStruct((2, 1, 768), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)
  out = jax.eval_shape(model.apply, variables, x, t, ctx)
  assert out.shape == (2, size, size, 4) and out.dtype == jnp.float32
  n = _count(variables)
  assert n == PINNED_PARAMS["imagenet"]
  assert abs(n - 400e6) / 400e6 < 0.10  # the paper's "about 400M"


def test_t2i_variant_builds_with_text_context():
  model = unet.from_variant("t2i", attention_impl="xla", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 77, 4096), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 77), jnp.bool_)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, mask)
  assert _count(variables) == PINNED_PARAMS["t2i"]
  out = jax.eval_shape(model.apply, variables, x, t, ctx, mask)
  assert out.shape == (1, 32, 32, 4) and out.dtype == jnp.float32
  # Heads 5 / 10 / 20 at head dim 64 (the paper's T2I), cross-attention from 4096-wide context.
  p = nn.unbox(variables)["params"]
  for name, heads in (("down1_block3_T", 5), ("down2_block3_T", 10), ("down3_block2_T", 20)):
    assert p[name]["attention"]["query"]["kernel"].shape[-1] == heads * 64
  assert p["down3_block2_T"]["cross_attention"]["key"]["kernel"].shape == (4096, 1280)


def test_up_layout_must_consume_every_skip():
  with pytest.raises(ValueError, match="fewer blocks"):
    _tiny(up_layout="C-C-CT").levels()
  assert _tiny(up_layout="CC-CTC-CTT").levels()[1] == ("CC", "CTC", "CTT")


# --- the classifier is unchanged by the UNet's opt-in block options ---------------------------

@pytest.mark.parametrize("variant", ["T", "B", "L"])
def test_classifier_parameter_counts_unchanged(variant):
  model = ascan.AsCAN(num_classes=1000, attention_impl="xla", **variants.VARIANTS[variant])
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(variables) == CLASSIFIER_PINNED_PARAMS[variant]
  names = set(variables["params"]["stage2_block1_C"])
  assert {"expand_bn", "project_bn"} <= names and "emb_proj" not in names
  assert set(variables["params"]["stage2_block4_T"]["attention"]) == {
      "query", "key", "value", "out", "rel_pos"}


def test_conv_block_group_norm_and_embedding_are_opt_in():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  emb = jax.random.normal(jax.random.key(1), (2, 12))
  block = blocks.ConvBlock(8, norm="group", norm_groups=4)
  variables = nn.unbox(jax.jit(block.init, static_argnums=2)(jax.random.key(2), x, False, emb))
  assert set(variables) == {"params"}
  assert {"expand_norm", "project_norm", "emb_proj"} <= set(variables["params"])
  assert variables["params"]["emb_proj"]["kernel"].shape == (12, 32)
  apply = jax.jit(block.apply, static_argnums=2)
  a = apply(variables, x, False, emb)
  b = apply(variables, x, False, emb + 1.0)
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(blocks.ConvBlock(8, norm="layer").init, jax.random.key(0), x, False)


def test_transformer_block_adds_cross_attention_in_parallel():
  """y = x + self_attn(ln x) + cross_attn(ln x, ctx) + mlp(ln x)."""
  block = blocks.TransformerBlock(num_heads=2, head_dim=8, train_grid=(4, 4),
                                  attention_impl="xla", position="rope", qk_norm=True,
                                  cross_attention=True)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  ctx = jax.random.normal(jax.random.key(1), (2, 3, 10))
  variables = nn.unbox(jax.jit(block.init, static_argnums=2)(jax.random.key(2), x, False, ctx))
  p = variables["params"]
  assert "rel_pos" not in p["attention"] and "query_norm" in p["cross_attention"]
  apply = jax.jit(block.apply, static_argnums=2)
  y = apply(variables, x, False, ctx)
  no_cross = flax.core.unfreeze(p)
  no_cross["cross_attention"]["out"] = jax.tree.map(jnp.zeros_like, p["cross_attention"]["out"])
  y0 = apply({"params": no_cross}, x, False, ctx)
  xn = nn.LayerNorm(epsilon=1e-6).apply({"params": p["norm"]}, x)
  cross = jax.jit(blocks.attention_lib.MultiHeadCrossAttention(2, 8, "xla", qk_norm=True).apply)(
      {"params": p["cross_attention"]}, xn, ctx)
  np.testing.assert_allclose(y - y0, cross, atol=1e-5)
  with pytest.raises(ValueError, match="context"):
    jax.eval_shape(block.apply, variables, x, False)
