"""Optimizer schedule and decay mask, durations, EMA, mixup/cutmix, accumulation, remat."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ascan_jax import tasks
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.tasks import classification
from ascan_jax.train import optim
from ascan_jax.train import builder
from ascan_jax.train import state as state_lib
from ascan_jax.train import step as step_lib
from configs import ascan_t


def test_durations_steps_take_precedence_over_epochs():
  c = ascan_t.get_config()  # 300 epochs, 20 warm-up epochs, batch 4096.
  d = optim.resolve_durations(c, 1_281_167)
  assert d.total_steps == round(300 * 1_281_167 / 4096)
  assert d.warmup_steps == round(20 * 1_281_167 / 4096)
  c.total_steps = 100
  c.optim.warmup_steps = 7
  d = optim.resolve_durations(c, 1_281_167)
  assert (d.total_steps, d.warmup_steps) == (100, 7)


def test_schedule_warmup_peak_and_cosine_end():
  c = ascan_t.get_config()
  d = optim.Durations(total_steps=1000, warmup_steps=100, steps_per_epoch=10.0)
  lr = optim.learning_rate_schedule(c.optim, d)
  assert float(lr(0)) == pytest.approx(5e-7)
  assert float(lr(50)) == pytest.approx(5e-7 + 0.5 * (3e-3 - 5e-7), rel=1e-5)
  assert float(lr(100)) == pytest.approx(3e-3, rel=1e-6)
  assert float(lr(550)) == pytest.approx(5e-6 + 0.5 * (3e-3 - 5e-6), rel=1e-4)
  assert float(lr(1000)) == pytest.approx(5e-6, rel=1e-4)
  values = [float(lr(s)) for s in range(100, 1001, 50)]
  assert values == sorted(values, reverse=True)


def test_weight_decay_only_on_kernels():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
            "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
            "rel_pos": {"table": jnp.ones((2, 3, 3))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"conv": {"kernel": True, "bias": False},
                  "bn": {"scale": False, "bias": False}, "rel_pos": {"table": False}}
  c = ascan_t.get_config()
  c.optim.grad_clip_norm = 0.0
  tx, _ = optim.make_optimizer(c.optim, optim.Durations(10, 0, 1.0))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0  # decayed
  assert float(jnp.abs(updates["conv"]["bias"]).max()) == 0
  assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0


def test_gradient_clipping_bounds_the_update_norm():
  c = ascan_t.get_config()
  c.optim.weight_decay = 0.0
  tx, _ = optim.make_optimizer(c.optim, optim.Durations(10, 0, 1.0))
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  big = {"w": jnp.full(4, 1e6)}
  clipped = optim.optax.clip_by_global_norm(1.0).update(big, None)[0]
  assert float(jnp.linalg.norm(clipped["w"])) == pytest.approx(1.0, rel=1e-5)
  updates, _ = tx.update(big, state, params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0])}
  new = {"a": jnp.array([3.0, 6.0])}
  out = step_lib.ema_update(ema, new, 0.9)
  np.testing.assert_allclose(out["a"], [1.2, 2.4], rtol=1e-6)
  assert step_lib.ema_update(ema, new, 0.0) is new


def test_ema_warmup_follows_early_weights_then_reaches_the_decay():
  assert step_lib.ema_decay_at(5, 0.999, False) == 0.999
  np.testing.assert_allclose(step_lib.ema_decay_at(0, 0.999, True), 0.1, rtol=1e-6)
  np.testing.assert_allclose(step_lib.ema_decay_at(90, 0.999, True), 91 / 100, rtol=1e-6)
  np.testing.assert_allclose(step_lib.ema_decay_at(10**6, 0.999, True), 0.999, rtol=1e-6)
  # In a train step the EMA of a first step with warm-up is 0.1 * init + 0.9 * new params.
  tx = optax.sgd(1.0)
  params = {"w": jnp.array([1.0])}
  state = state_lib.make_init_fn(lambda k: {"params": params}, tx, seed=0)()
  loss = lambda p, ms, b, k: (jnp.sum(p["w"] * b["x"]), (ms, {}))
  for warmup, expected in ((True, 1.0 - 0.9 * 2.0), (False, 1.0 - 0.001 * 2.0)):
    step = step_lib.make_train_step(loss, tx, lambda s: 1.0, ema_decay=0.999, ema_warmup=warmup)
    new, _ = step(state, {}, {"x": jnp.array([2.0])})
    np.testing.assert_allclose(new.params["w"], [-1.0])
    np.testing.assert_allclose(new.ema_params["w"], [expected], rtol=1e-6)


def _aug(mixup=0.0, cutmix=0.0, switch=0.5):
  return ml_collections.ConfigDict(dict(mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=1.0,
                                        cutmix_switch_prob=switch))


def test_mixup_targets_and_padding():
  images = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  targets = jax.nn.one_hot(jnp.arange(6) % 3, 3)
  mask = jnp.array([1, 1, 1, 1, 1, 0.0])
  out_images, out_targets = classification.mix_batch(jax.random.key(1), images, targets, mask,
                                                     _aug(mixup=0.8))
  np.testing.assert_allclose(out_targets.sum(-1), 1.0, rtol=1e-6)
  # Example 0's partner (the mirror, example 5) is padding: left unmixed.
  np.testing.assert_allclose(out_images[0], images[0], rtol=1e-6)
  np.testing.assert_allclose(out_targets[0], targets[0], rtol=1e-6)
  lam = float(out_targets[1, 1])  # example 1 (label 1) mixed with example 4 (label 1)...
  lam2 = float(out_targets[2, 2])  # ... example 2 (label 2) with example 3 (label 0).
  np.testing.assert_allclose(out_images[2], lam2 * images[2] + (1 - lam2) * images[3],
                             rtol=1e-5, atol=1e-6)
  assert 0.0 <= lam <= 1.0


def test_cutmix_area_matches_label_weight():
  images = jnp.zeros((4, 16, 16, 1)).at[2:].set(1.0)  # mirrors: 0<->3, 1<->2.
  targets = jax.nn.one_hot(jnp.array([0, 0, 1, 1]), 2)
  out_images, out_targets = classification.mix_batch(
      jax.random.key(3), images, targets, jnp.ones(4), _aug(cutmix=1.0))
  pasted = float(out_images[0].mean())  # share of example 0 covered by example 3's pixels.
  assert pasted == pytest.approx(float(out_targets[0, 1]), abs=1e-6)
  assert 0.0 < pasted < 1.0


def _tiny_setup(microbatches=1, remat="none"):
  c = ascan_t.get_config("runlocal")
  c.model.layout = "C-CT-CT-CT"
  c.model.widths = (16, 32, 32, 32)
  c.model.stem_width = 16
  c.model.head_dim = 16
  c.model.embed_dim = 32
  c.model.drop_path_rate = 0.0
  c.model.remat_policy = remat
  c.batch_size = 8
  c.microbatches = microbatches
  c.total_steps = 5
  c.mesh.shape = (1, 1, 1)
  task = tasks.get_task(c)
  setup = builder.build(task, c, 100, mesh=mesh_lib.make_mesh(c, jax.devices()[:1]))
  return task, setup


def test_gradient_accumulation_averages_microbatch_losses():
  task, setup = _tiny_setup(microbatches=2)
  _, single = _tiny_setup(microbatches=1)
  batch = task.synthetic_batch(8, jax.random.key(0))
  state = builder.create_state(setup)
  _, metrics = setup.train_step(state, {}, batch)
  # Micro-batch i is every second example from i; its loss from the same initial state.
  initial = builder.create_state(single)
  loss_fn = jax.jit(lambda half: task.loss_fn(initial.params, initial.model_state, half,
                                              jax.random.key(0))[0])
  losses = [float(loss_fn(jax.tree.map(lambda x, i=i: x[i::2], batch))) for i in range(2)]
  np.testing.assert_allclose(float(metrics["train/loss"]), np.mean(losses), rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_do_not_change_the_step(policy):
  task, plain = _tiny_setup()
  _, remat = _tiny_setup(remat=policy)
  batch = task.synthetic_batch(8, jax.random.key(0))
  _, m1 = plain.train_step(builder.create_state(plain), {}, batch)
  _, m2 = remat.train_step(builder.create_state(remat), {}, batch)
  np.testing.assert_allclose(float(m1["train/loss"]), float(m2["train/loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["train/grad_norm"]), float(m2["train/grad_norm"]),
                             rtol=1e-4)
