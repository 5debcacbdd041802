"""AsCAN backbone: variant sizes, shapes at two resolutions, drop-path, BatchNorm, blocks."""
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.models import ascan
from ascan_jax.models import blocks
from ascan_jax.models import variants
from ascan_jax.modes import summary
from configs import ascan_b, ascan_l, ascan_t
from ascan_jax import tasks

CONFIGS = {"T": ascan_t, "B": ascan_b, "L": ascan_l}
# Pinned parameter counts (1000 classes). A change here is an architecture change: update the
# README's variant table together with these numbers.
PINNED_PARAMS = {"T": 21_686_188, "B": 94_280_654, "L": 173_814_949}
# Targets: the paper's AsCAN-L (173M, 30.7 GMACs); T and B are MaxViT-T/B's 5.6 / 24.2 GMACs
# scaled by the L ratio 30.7 / 43.9 (the targets).
MAC_TARGETS = {"T": 5.6 * 30.7 / 43.9, "B": 24.2 * 30.7 / 43.9, "L": 30.7}
MAC_TOLERANCE = {"T": 0.15, "B": 0.15, "L": 0.03}


def _model(variant, **kw):
  v = dict(variants.VARIANTS[variant])
  v.update(kw)
  return ascan.AsCAN(num_classes=1000, attention_impl="xla", **v)


@pytest.mark.parametrize("variant", ["T", "B", "L"])
@pytest.mark.parametrize("size", [224, 288])
def test_variant_shapes_at_two_resolutions(variant, size):
  model = _model(variant)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1]), x)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_features=True), variables, x)
  chex.assert_shape(logits, (2, 1000))
  widths = variants.VARIANTS[variant]["widths"]
  expected = [(2, size // 4 // 2**i, size // 4 // 2**i, w) for i, w in enumerate(widths)]
  assert [f.shape for f in feats] == expected


@pytest.mark.parametrize("variant", ["T", "B", "L"])
def test_parameter_counts_are_pinned(variant):
  model = _model(variant)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert n == PINNED_PARAMS[variant]
  if variant == "L":
    assert abs(n - 173e6) / 173e6 < 0.02


@pytest.mark.parametrize("variant", ["T", "B", "L"])
def test_macs_match_targets(variant):
  config = CONFIGS[variant].get_config()
  task = tasks.get_task(config)
  model = task.build_model(attention_impl="xla")
  counted = summary.count_forward_macs(task, model, summary.abstract_variables(task, model))
  gmacs = counted["macs"] / 1e9
  assert abs(gmacs - MAC_TARGETS[variant]) / MAC_TARGETS[variant] < MAC_TOLERANCE[variant], gmacs


def test_real_forward_runs_at_train_and_other_resolution():
  model = ascan.AsCAN(layout="C-CCT-CT-T", widths=(16, 32, 32, 64), stem_width=16,
                      num_classes=7, embed_dim=32, head_dim=16, table_image_size=64,
                      attention_impl="xla")
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  for size in (64, 96):
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    out = jax.jit(model.apply)(variables, x)
    chex.assert_shape(out, (2, 7))
    chex.assert_tree_all_finite(out)


def _apply(model, variables, x, train, key=None):
  """Jitted apply; returns (output, new batch stats) in training."""
  rngs = {"dropout": key} if key is not None else {}
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, rngs=rngs,
                                            mutable=["batch_stats"]))(variables, x)
  return jax.jit(lambda v, x: model.apply(v, x, train=False, rngs=rngs))(variables, x)


def _tiny(drop_path=0.5, **kw):
  return ascan.AsCAN(layout="C-CT-CT-T", widths=(8, 16, 16, 32), stem_width=8, num_classes=5,
                     embed_dim=16, head_dim=8, table_image_size=32, drop_path_rate=drop_path,
                     attention_impl="xla", **kw)


def test_drop_path_inactive_in_eval_and_active_in_train():
  model = _tiny()
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))
  eval_a = _apply(model, variables, x, False, jax.random.key(2))
  eval_b = _apply(model, variables, x, False, jax.random.key(3))
  np.testing.assert_array_equal(eval_a, eval_b)
  # Give the classifier non-zero weights so the logits depend on the features.
  params = flax.core.unfreeze(variables["params"])
  params["classifier"]["kernel"] = jax.random.normal(jax.random.key(4),
                                                     params["classifier"]["kernel"].shape)
  variables = {**variables, "params": params}
  train_a, _ = _apply(model, variables, x, True, jax.random.key(2))
  train_b, _ = _apply(model, variables, x, True, jax.random.key(3))
  assert not np.allclose(train_a, train_b)
  # Without drop-path the training output does not depend on the key.
  plain = _tiny(drop_path=0.0)
  ta, _ = _apply(plain, variables, x, True, jax.random.key(2))
  tb, _ = _apply(plain, variables, x, True, jax.random.key(3))
  np.testing.assert_allclose(ta, tb, rtol=1e-6, atol=1e-6)


def test_drop_path_rescales_kept_examples():
  layer = blocks.DropPath(0.5)
  x = jnp.ones((1000, 3))
  y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y[:, 0])
  assert set(np.unique(kept)) <= {0.0, 2.0}
  assert 0.4 < np.mean(kept == 2.0) < 0.6


def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
  model = _tiny(drop_path=0.0)
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))
  params = flax.core.unfreeze(variables["params"])
  params["classifier"]["kernel"] = jax.random.normal(jax.random.key(4),
                                                     params["classifier"]["kernel"].shape)
  variables = {**variables, "params": params}
  eval_out = _apply(model, variables, x, False)
  train_out, new_state = _apply(model, variables, x, True)
  assert not np.allclose(eval_out, train_out, atol=1e-3)
  old = variables["batch_stats"]["stem_bn1"]["mean"]
  new = new_state["batch_stats"]["stem_bn1"]["mean"]
  assert not np.allclose(old, new)
  # Eval leaves the statistics alone.
  _, same = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(
      variables, x)
  chex.assert_trees_all_equal(same["batch_stats"], variables["batch_stats"])


def test_transformer_block_is_parallel_residual():
  """y = x + attn(ln x) + mlp(ln x): zeroing both output projections gives y == x exactly."""
  block = blocks.TransformerBlock(num_heads=2, head_dim=8, train_grid=(4, 4),
                                  attention_impl="xla")
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  variables = nn.unbox(block.init(jax.random.key(1), x, train=False))
  y = block.apply(variables, x, train=False)
  assert not np.allclose(y, x)
  params = flax.core.unfreeze(variables["params"])
  for name in (("attention", "out"), ("mlp_out",)):
    node = params
    for n in name:
      node = node[n]
    node["kernel"] = jnp.zeros_like(node["kernel"])
    node["bias"] = jnp.zeros_like(node["bias"])
  y = block.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(y, x)


def test_conv_block_downsamples_and_widens():
  block = blocks.ConvBlock(features=24, stride=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 12))
  variables = nn.unbox(block.init(jax.random.key(1), x, train=False))
  y = block.apply(variables, x, train=False)
  chex.assert_shape(y, (2, 4, 4, 24))
  # Dense (not depthwise) 3x3 expansion to 4x the input width.
  chex.assert_shape(variables["params"]["expand_conv"]["kernel"], (3, 3, 12, 48))
  chex.assert_shape(variables["params"]["se"]["reduce"]["kernel"], (1, 1, 48, 3))


def test_t_first_stage_gets_a_downsample():
  model = ascan.AsCAN(layout="C-TC-TT-T", widths=(8, 16, 16, 32), stem_width=8, num_classes=3,
                      embed_dim=16, head_dim=8, table_image_size=32, attention_impl="xla")
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert "stage2_downsample" in variables["params"]
  assert "stage1_downsample" not in variables["params"]


def test_bf16_compute_keeps_fp32_params():
  model = _tiny(dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  out = _apply(model, variables, x, False)
  assert out.dtype == jnp.float32  # the classifier runs in float32.
  chex.assert_tree_all_finite(out)
