"""BatchNorm across devices (global or per-device statistics), micro-batched running statistics,
and the GELU choice reaching every activation of the model.

Runs on the 8 fake CPU devices of conftest.py. The reference for per-device statistics is flax's
own ``nn.BatchNorm`` applied to each device's shard of the batch separately.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ascan_jax import config_defaults
from ascan_jax import config_validation as cv
from ascan_jax import tasks
from ascan_jax.models import ascan
from ascan_jax.models import blocks
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.tasks import classification
from ascan_jax.train import state as state_lib
from ascan_jax.train import step as step_lib
from configs import ascan_t

MOMENTUM = 0.9
RULES = config_defaults.DEFAULT_RULES


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _inputs(batch=16, channels=6):
  x = jax.random.normal(jax.random.key(0), (batch, 5, 5, channels)) * 3.0 + 1.0
  # Shards with different statistics, so per-device and global normalisation differ.
  return x + jnp.arange(batch, dtype=jnp.float32)[:, None, None, None] * 0.5


def _variables(channels=6):
  return {"params": {"scale": jnp.linspace(0.5, 2.0, channels),
                     "bias": jnp.linspace(-1.0, 1.0, channels)},
          "batch_stats": {"mean": jnp.full((channels,), 0.3), "var": jnp.full((channels,), 2.0)}}


def _train_apply(stats, mesh, variables, x):
  """One training-mode BatchNorm call jitted over ``mesh`` with the batch sharded."""
  layer = blocks.batch_norm(True, MOMENTUM, jnp.float32, "bn", stats=stats)

  def f(v, x):
    with sharding_lib.in_mesh(mesh, RULES):
      return layer.apply(v, x, mutable=["batch_stats"])

  batch = NamedSharding(mesh, P(("data", "fsdp")))
  return jax.jit(f, in_shardings=(None, batch))(variables, x)


def _flax_train(variables, x):
  return nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=1e-5).apply(
      variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("shape,shards", [((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 1, 8), 1)])
def test_per_device_statistics_are_flax_batch_norm_per_shard(shape, shards):
  variables, x = _variables(), _inputs()
  y, new = _train_apply("per_device", _mesh(shape), variables, x)
  pieces = [_flax_train(variables, xs) for xs in jnp.split(x, shards)]
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in pieces]), rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):  # the running averages move towards the mean shard statistic.
    want = np.mean([p[1]["batch_stats"][k] for p in pieces], axis=0)
    np.testing.assert_allclose(new["batch_stats"][k], want, rtol=1e-5, atol=1e-6)
  if shards > 1:  # ... which is not what global statistics give.
    assert not np.allclose(y, _flax_train(variables, x)[0], atol=1e-3)


def test_global_statistics_cover_the_global_batch_and_eval_uses_running_averages():
  variables, x = _variables(), _inputs()
  y, new = _train_apply("global", _mesh((8, 1, 1)), variables, x)
  ref_y, ref_new = _flax_train(variables, x)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], ref_new["batch_stats"]["var"], rtol=1e-5)
  for stats in blocks.BATCH_NORMS:  # inference: the same running-average arithmetic as flax.
    out = blocks.batch_norm(False, MOMENTUM, jnp.float32, "bn", stats=stats).apply(variables, x)
    ref = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _all_reduces(stats):
  """All-reduces in the gradient (w.r.t. the input) of one training BatchNorm on 8 devices; the
  running statistics are dropped, so only what the forward/backward path needs remains."""
  mesh = _mesh((8, 1, 1))
  layer = blocks.batch_norm(True, MOMENTUM, jnp.float32, "bn", stats=stats)

  def loss(x, v):
    with sharding_lib.in_mesh(mesh, RULES):
      y, _ = layer.apply(v, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))

  batch = NamedSharding(mesh, P(("data", "fsdp")))
  text = jax.jit(jax.grad(loss), in_shardings=(batch, None)).lower(
      _inputs(), _variables()).compile().as_text()
  return text.count(" all-reduce(") + text.count(" all-reduce-start(")


def test_per_device_statistics_need_no_collective_global_ones_do():
  assert _all_reduces("per_device") == 0
  assert _all_reduces("global") >= 2  # forward statistics and their backward.


def test_shard_local_batch_norm_has_flax_batch_norm_variables():
  x = jnp.zeros((2, 4, 4, 3))
  ours = blocks.batch_norm(True, MOMENTUM, jnp.float32, "bn", stats="per_device").init(
      jax.random.key(0), x)
  theirs = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, nn.unbox(ours)) == jax.tree.map(np.shape, theirs)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(ours), theirs)


class _BNNet(nn.Module):
  """conv -> BatchNorm -> dense: a model whose running statistics the step must update."""

  @nn.compact
  def __call__(self, x, train):
    x = blocks.conv(4, 3, dtype=jnp.float32, name="conv")(x)
    x = blocks.batch_norm(train, MOMENTUM, jnp.float32, "bn")(x)
    return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))


def _bn_step(microbatches, x, y):
  net = _BNNet()
  tx = optax.sgd(0.1)

  def loss_fn(params, model_state, batch, key):
    out, new = net.apply({"params": params, **model_state}, batch["x"], train=True,
                         mutable=list(model_state))
    return jnp.mean((out[:, 0] - batch["y"]) ** 2), (new, {})

  init = state_lib.make_init_fn(lambda k: net.init(k, x[:1], train=False), tx, seed=0)
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, lambda s: 0.1, microbatches=microbatches))
  state, _ = step(init(), {}, {"x": x, "y": y})
  return init(), state


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_move_running_statistics_once_per_step(microbatches):
  x = jax.random.normal(jax.random.key(3), (8, 6, 6, 2)) + 2.0
  y = jax.random.normal(jax.random.key(4), (8,))
  init, state = _bn_step(microbatches, x, y)
  # Reference: each micro-batch (every n-th example) updates the *initial* statistics once;
  # the step's statistics are their mean. Chained updates (momentum ** n) fail this.
  net = _BNNet()
  variables = {"params": init.params, **init.model_state}
  updates = [net.apply(variables, x[i::microbatches], train=True, mutable=["batch_stats"])[1]
             for i in range(microbatches)]
  for k in ("mean", "var"):
    want = np.mean([u["batch_stats"]["bn"][k] for u in updates], axis=0)
    np.testing.assert_allclose(state.model_state["batch_stats"]["bn"][k], want, rtol=1e-5,
                               atol=1e-6)
  # The running mean of the first BatchNorm equals the full-batch step's (equal micro-batches).
  _, full = _bn_step(1, x, y)
  np.testing.assert_allclose(state.model_state["batch_stats"]["bn"]["mean"],
                             full.model_state["batch_stats"]["bn"]["mean"], rtol=1e-5, atol=1e-6)


def _count_primitives(jaxpr, names, counts=None):
  """How often each primitive of ``names`` occurs in ``jaxpr``, nested jaxprs included."""
  counts = dict.fromkeys(names, 0) if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in counts:
      counts[eqn.primitive.name] += 1
    for param in eqn.params.values():
      for item in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          _count_primitives(inner, names, counts)
  return counts


@pytest.mark.parametrize("gelu", blocks.GELUS)
def test_gelu_choice_reaches_every_activation(gelu):
  layout = "C-CT-C-T"
  model = ascan.AsCAN(layout=layout, widths=(8, 16, 16, 16), stem_width=8, num_classes=3,
                      embed_dim=16, head_dim=8, table_image_size=32, attention_impl="xla",
                      gelu=gelu)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, jnp.ones((2, 32, 32, 3)))
  counts = _count_primitives(jaxpr.jaxpr, ("erfc", "tanh"))
  # stem (2) + every C block (expansion and squeeze-excite) + every T block's MLP + head (1).
  expected = 2 + 2 * layout.count("C") + layout.count("T") + 1
  exact, tanh = (expected, 0) if gelu == "exact" else (0, expected)
  assert (counts["erfc"], counts["tanh"]) == (exact, tanh)


def test_config_keys_defaults_validation_and_old_runs():
  c = ascan_t.get_config("runlocal")
  assert (c.model.gelu, c.model.batch_norm) == ("exact", "global")
  task = tasks.get_task(c)
  assert (task.model.gelu, task.model.batch_norm) == ("exact", "global")
  for key, bad in (("model.gelu", "erf"), ("model.batch_norm", "sync")):
    c2 = ascan_t.get_config("runlocal")
    section, name = key.split(".")
    c2[section][name] = bad
    with pytest.raises(cv.ConfigError, match=f"config.{key}"):
      tasks.validate(c2, num_devices=1)
  # A run saved before model.gelu existed computed the tanh approximation.
  saved = {"task": "classification", "model": {"layout": "C-CCCT-CCTT-CTTT"}}
  old, _ = tasks.config_from_saved(saved)
  assert old.model.gelu == "tanh"
  new, _ = tasks.config_from_saved({**saved, "model": {"gelu": "exact"}})
  assert new.model.gelu == "exact"
  assert classification.Task.upgrade_config({"model": {"gelu": "exact"}})["model"]["gelu"] == "exact"
