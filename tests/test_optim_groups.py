"""Schedules (cosine, constant, linear, poly) and parameter groups (lr / weight-decay multipliers,
layer-wise decay) of the optimizer the train step uses."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ascan_jax import config_defaults
from ascan_jax.models import ascan
from ascan_jax.train import optim


def _optim(**overrides):
  o = config_defaults.base().optim
  o.update(dict(peak_lr=1.0, init_lr=0.0, end_lr=0.1, grad_clip_norm=0.0, weight_decay=0.5))
  o.update(overrides)
  return o


DURATIONS = optim.Durations(total_steps=110, warmup_steps=10, steps_per_epoch=1.0)


@pytest.mark.parametrize("kind,at_60,at_110", [
    ("cosine", 0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)), 0.1),
    ("linear", 1.0 + (0.1 - 1.0) * 0.5, 0.1),
    ("poly", 0.1 + 0.9 * 0.5 ** 2.0, 0.1),
    ("constant", 1.0, 1.0),
])
def test_schedules_after_a_linear_warmup(kind, at_60, at_110):
  s = optim.learning_rate_schedule(_optim(schedule=kind, poly_power=2.0), DURATIONS)
  np.testing.assert_allclose(s(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(s(5), 0.5, rtol=1e-6)  # half-way through the warm-up.
  np.testing.assert_allclose(s(10), 1.0, rtol=1e-6)  # the peak at the end of the warm-up.
  np.testing.assert_allclose(s(60), at_60, rtol=1e-5)
  np.testing.assert_allclose(s(110), at_110, rtol=1e-5)


PARAMS = {"backbone": {"conv": {"kernel": jnp.full((3,), 2.0)},
                       "norm": {"scale": jnp.full((3,), 2.0)}},
          "head": {"kernel": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}


def _first_update(o, grads):
  tx, _ = optim.make_optimizer(o, DURATIONS, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_groups_scale_learning_rate_and_weight_decay_per_parameter():
  o = _optim(schedule="constant", init_lr=1.0, groups=(("^backbone/", 0.1, 0.0),))
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  # Zero gradients isolate the decoupled weight decay: -lr * wd * wd_mult * p on kernels only.
  decay = _first_update(o, zeros)
  np.testing.assert_allclose(decay["head"]["kernel"], -1.0 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(decay["head"]["bias"], 0.0)  # not a kernel: never decayed.
  np.testing.assert_allclose(decay["backbone"]["conv"]["kernel"], 0.0)  # wd multiplier 0.
  # Adam's first step is -lr * sign(g): the backbone's lr is 0.1 of the head's.
  ones = jax.tree.map(jnp.ones_like, PARAMS)
  step = _first_update(_optim(schedule="constant", init_lr=1.0, weight_decay=0.0,
                              groups=o.groups), ones)
  np.testing.assert_allclose(step["head"]["bias"], -1.0, rtol=1e-5)
  np.testing.assert_allclose(step["backbone"]["norm"]["scale"], -0.1, rtol=1e-5)


def test_without_groups_the_optimizer_is_a_single_adamw():
  tx, _ = optim.make_optimizer(_optim(), DURATIONS, PARAMS)
  single = optax.chain(optax.adamw(lambda step: 1.0, weight_decay=0.5,
                                  mask=optim.weight_decay_mask))
  assert jax.tree.structure(tx.init(PARAMS)) == jax.tree.structure(single.init(PARAMS))


def test_layer_wise_decay_follows_the_backbone_depth():
  layer_of = ascan.parameter_layer_fn("C-CT-CT")
  params = {"stem_conv1": {"kernel": 0}, "stage1_block1_C": {"kernel": 0},
            "stage3_block2_T": {"kernel": 0}, "classifier": {"kernel": 0}}
  mults = optim.group_multipliers(params, (), layer_of, 0.5)
  num_layers = 6  # stem 0, five blocks 1..5, the head 6.
  assert mults["classifier"]["kernel"] == (1.0, 1.0)
  assert mults["stage3_block2_T"]["kernel"] == (0.5 ** (num_layers - 5), 1.0)
  assert mults["stage1_block1_C"]["kernel"] == (0.5 ** (num_layers - 1), 1.0)
  assert mults["stem_conv1"]["kernel"] == (0.5 ** num_layers, 1.0)


def test_gradient_clipping_is_applied_before_adam():
  """Adam's first step does not depend on the gradient's scale, its second does: two steps with a
  huge then a small gradient equal AdamW fed the clipped gradients, and differ without clipping."""
  big = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
  small = jax.tree.map(lambda p: jnp.full_like(p, 0.01), PARAMS)
  clip = optax.clip_by_global_norm(1.0)

  def two_steps(tx, grads):
    state = tx.init(PARAMS)
    for g in grads:
      update, state = tx.update(g, state, PARAMS)
    return update

  ours, _ = optim.make_optimizer(_optim(grad_clip_norm=1.0), DURATIONS, PARAMS)
  unclipped, _ = optim.make_optimizer(_optim(grad_clip_norm=0.0), DURATIONS, PARAMS)
  clipped_grads = [clip.update(g, clip.init(PARAMS))[0] for g in (big, small)]
  expected = two_steps(unclipped, clipped_grads)
  got = two_steps(ours, [big, small])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, expected)
  other = two_steps(unclipped, [big, small])
  assert not np.allclose(other["head"]["kernel"], got["head"]["kernel"], rtol=1e-3)


def test_bad_group_entries_are_named():
  from ascan_jax import config_validation as cv
  from configs import ascan_t
  c = ascan_t.get_config()
  c.optim.groups = (("[unclosed", 1.0, 1.0),)
  with pytest.raises(cv.ConfigError, match=r"config.optim.groups: entry 0 regex"):
    cv.check_values(c)
  c.optim.groups = (("x", -1.0, 1.0),)
  with pytest.raises(cv.ConfigError, match="multipliers must be numbers >= 0"):
    cv.check_values(c)
  c.optim.groups = ()
  c.optim.schedule = "step"
  with pytest.raises(cv.ConfigError, match="config.optim.schedule"):
    cv.check_values(c)


def test_groups_train_checkpoint_and_resume_through_the_loop(tmp_path):
  """Groups give optax.multi_transform state with MaskedNode leaves inside boxed parameters: the
  builder must shard that state, the loop train and checkpoint it, and a run resume from it."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from ascan_jax.modes import train as train_mode  # pylint: disable=g-import-not-at-top
  from tests import toy_tasks  # pylint: disable=g-import-not-at-top

  class BoxedToy(toy_tasks.ToyTask):
    """The toy task with logically partitioned (boxed) parameters, as every real model has."""

    def build_model(self, **overrides):
      box = nn.with_logical_partitioning
      return nn.Dense(self.config.model.num_classes,
                      kernel_init=box(nn.initializers.lecun_normal(), ("embed", "classes")),
                      bias_init=box(nn.initializers.zeros, ("classes",)), **overrides)

  config = toy_tasks.default_config()
  config.optim.groups = (("^bias$", 0.0, 0.0),)  # the bias is frozen by its lr multiplier.
  config.optim.warmup_steps = 0
  config.mesh.shape = (1, 8, 1)
  task = BoxedToy(config)
  init = jax.device_get(nn.unbox(task.init_variables(jax.random.key(config.seed))["params"]))
  state = train_mode.train(task, config, str(tmp_path))
  params = jax.device_get(state.params)
  np.testing.assert_array_equal(params["bias"], init["bias"])
  assert np.abs(params["kernel"] - init["kernel"]).max() > 0
  config.total_steps = 6
  resumed = train_mode.train(BoxedToy(config), config, str(tmp_path))
  assert int(resumed.step) == 6
  np.testing.assert_array_equal(jax.device_get(resumed.params)["bias"], init["bias"])
