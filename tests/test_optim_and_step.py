"""Optimizer schedule and decay mask, durations, EMA, mixup/cutmix in groups, gradient
accumulation against the full-batch step, a bfloat16 train step, remat."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ascan_jax import config_validation as cv
from ascan_jax import tasks
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.parallel import sharding as sharding_lib
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
  """Our optimizer chain clips before Adam: a huge first gradient then leaves Adam's moments as a
  gradient of norm ``grad_clip_norm`` would, so the next update is the same. Without the clip
  the huge first moments would decide the next update's direction alone."""
  c = ascan_t.get_config()
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  tx, _ = optim.make_optimizer(c.optim, optim.Durations(10, 0, 1.0))
  params = {"w": jnp.ones(4)}
  big = {"w": jnp.array([1e6, -2e6, 3e6, 0.5e6])}
  at_norm = {"w": big["w"] / jnp.linalg.norm(big["w"])}
  small = {"w": jnp.array([-0.5, 0.5, -0.5, 0.5])}  # about the clipped gradient's size.

  def second_update(first):
    state = tx.init(params)
    _, state = tx.update(first, state, params)
    return tx.update(small, state, params)[0]["w"]

  np.testing.assert_allclose(second_update(big), second_update(at_norm), rtol=1e-5, atol=1e-9)
  c.optim.grad_clip_norm = 0.0
  unclipped, _ = optim.make_optimizer(c.optim, optim.Durations(10, 0, 1.0))
  state = unclipped.init(params)
  _, state = unclipped.update(big, state, params)
  raw = unclipped.update(small, state, params)[0]["w"]
  assert not np.allclose(raw, second_update(big), rtol=0.1)  # the huge gradient dominates.


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


def _aug(mixup=0.0, cutmix=0.0, switch=0.5, group=2):
  return ml_collections.ConfigDict(dict(mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=1.0,
                                        cutmix_switch_prob=switch, mix_group_size=group))


def _mix(key, images, targets, mask, aug):
  return jax.jit(lambda *a: classification.mix_batch(key, *a, aug))(images, targets, mask)


def test_mixup_pairs_within_groups_and_skips_padding():
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3)) * 255.0
  targets = jax.nn.one_hot(jnp.arange(6) % 3, 3)
  mask = jnp.array([1, 1, 1, 1, 1, 0.0])
  out_images, out_targets = _mix(jax.random.key(1), images, targets, mask,
                                 _aug(mixup=0.8, group=3))
  np.testing.assert_allclose(out_targets.sum(-1), 1.0, rtol=1e-6)
  # Groups {0,1,2} and {3,4,5}; partners are mirrors inside a group: 0<->2, 3<->5.
  lam0 = float(out_targets[0, 0])  # example 0 (label 0) mixed with example 2 (label 2).
  np.testing.assert_allclose(out_images[0], lam0 * images[0] + (1 - lam0) * images[2],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out_targets[2], [1 - lam0, 0.0, lam0], rtol=1e-5, atol=1e-6)
  # Example 3's partner (example 5) is padding: left unmixed.
  np.testing.assert_allclose(out_images[3], images[3], rtol=1e-6)
  np.testing.assert_allclose(out_targets[3], targets[3], rtol=1e-6)
  assert 0.0 < lam0 < 1.0


def test_cutmix_area_matches_label_weight():
  images = jnp.zeros((4, 16, 16, 1)).at[2:].set(1.0)  # one group of 4: 0<->3, 1<->2.
  targets = jax.nn.one_hot(jnp.array([0, 0, 1, 1]), 2)
  out_images, out_targets = _mix(jax.random.key(3), images, targets, jnp.ones(4),
                                 _aug(cutmix=1.0, group=4))
  pasted = float(out_images[0].mean())  # share of example 0 covered by example 3's pixels.
  assert pasted == pytest.approx(float(out_targets[0, 1]), abs=1e-6)
  assert 0.0 < pasted < 1.0


def test_mixed_batch_is_the_same_on_one_and_eight_devices_without_moving_images():
  images = jax.random.randint(jax.random.key(5), (32, 16, 16, 3), 0, 256).astype(jnp.uint8)
  targets = jax.nn.one_hot(jnp.arange(32) % 2, 2)
  mask = jnp.ones(32).at[6].set(0.0)
  aug = _aug(mixup=0.8, cutmix=1.0, group=4)
  mix = lambda im, t, m: classification.mix_batch(jax.random.key(6), im, t, m, aug)

  def uint8_and_normalised(im, t, m):
    # Mixing pixels then normalising is what mixing normalised images gives (affine per channel).
    mixed, mixed_t = mix(im, t, m)
    return classification.normalize(mixed), mixed_t, mix(classification.normalize(im), t, m)

  one, one_t, (ref, ref_t) = jax.jit(uint8_and_normalised)(images, targets, mask)
  np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(one_t, ref_t, rtol=1e-6, atol=1e-7)
  # Labels alternate 0/1, so example 4g (label 0) is mixed with 4g+3 (label 1) and its weight on
  # label 1 is group g's 1 - lambda: each group draws its own.
  assert len(np.unique(np.round(np.asarray(one_t[::4, 1]), 5))) > 1
  np.testing.assert_allclose(one_t[5], targets[5], rtol=1e-6)  # partner 6 is padding: unmixed.

  c = ascan_t.get_config()
  mesh = mesh_lib.make_mesh(c, jax.devices())  # (8, 1, 1): 4 examples, one group, per device.
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def mix_in_mesh(*args):  # as in the train step: the mesh and rules are in context.
    with sharding_lib.in_mesh(mesh, mesh_lib.rules(c)):
      return mix(*args)

  sharded = jax.jit(mix_in_mesh, in_shardings=batch, out_shardings=batch).lower(
      images, targets, mask).compile()
  eight, eight_t = sharded(images, targets, mask)
  # The same mixed batch up to float rounding (fusions differ with the layout).
  np.testing.assert_allclose(classification.normalize(eight), one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eight_t, one_t, rtol=1e-6, atol=1e-7)
  hlo = sharded.as_text()
  for op in ("collective-permute", "all-gather", "all-to-all", "all-reduce", "reduce-scatter"):
    assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op
  with pytest.raises(ValueError, match="mix_group_size"):
    mix(images[:30], targets[:30], mask[:30])


def test_mix_group_size_is_validated():
  c = ascan_t.get_config()  # batch 4096, mixup and cutmix on.
  c.augment.mix_group_size = 48
  with pytest.raises(cv.ConfigError, match="augment.mix_group_size.*micro-batch of 4096"):
    tasks.validate(c, num_devices=8)
  c.augment.mix_group_size = 16
  tasks.validate(c, num_devices=8)


def _tiny_setup(microbatches=1, remat="none", dtype="float32"):
  c = ascan_t.get_config("runlocal")
  c.model.layout = "C-CT-CT-CT"
  c.model.widths = (16, 32, 32, 32)
  c.model.stem_width = 16
  c.model.head_dim = 16
  c.model.embed_dim = 32
  c.model.drop_path_rate = 0.0
  c.model.remat_policy = remat
  c.model.dtype = dtype
  c.batch_size = 8
  c.microbatches = microbatches
  c.total_steps = 5
  c.mesh.shape = (1, 1, 1)
  task = tasks.get_task(c)
  setup = builder.build(task, c, 100, mesh=mesh_lib.make_mesh(c, jax.devices()[:1]))
  return task, setup


def _mlp_loss(params, model_state, batch, key):
  """A BatchNorm-free model with a masked mean loss, nonlinear in the parameters."""
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  per_example = (h @ params["w2"] - batch["y"]) ** 2
  loss = jnp.sum(per_example * batch["mask"]) / jnp.sum(batch["mask"])
  return loss, (model_state, {})


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_equals_the_full_batch_step(microbatches):
  k = jax.random.split(jax.random.key(0), 5)
  params = {"w1": jax.random.normal(k[0], (5, 7)), "b1": jnp.zeros(7),
            "w2": jax.random.normal(k[1], (7,))}
  batch = {"x": jax.random.normal(k[2], (8, 5)), "y": jax.random.normal(k[3], (8,)),
           "mask": jnp.ones(8)}
  tx = optax.sgd(0.5)  # SGD: the update is the gradient itself (Adam would hide its scale).
  init = state_lib.make_init_fn(lambda key: {"params": params}, tx, seed=0)

  def run(n):
    step = jax.jit(step_lib.make_train_step(_mlp_loss, tx, lambda s: 0.5, microbatches=n))
    return step(init(), {}, batch)

  full, full_metrics = run(1)
  acc, acc_metrics = run(microbatches)
  # Summed gradients, the last micro-batch's only, or no accumulation would each differ here.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               acc.params, full.params)
  np.testing.assert_allclose(float(acc_metrics["train/grad_norm"]),
                             float(full_metrics["train/grad_norm"]), rtol=1e-5)
  np.testing.assert_allclose(float(acc_metrics["train/loss"]), float(full_metrics["train/loss"]),
                             rtol=1e-5)
  assert not np.allclose(np.asarray(full.params["w1"]), np.asarray(params["w1"]))


def test_bfloat16_train_step_on_cpu():
  task, f32 = _tiny_setup()
  _, bf16 = _tiny_setup(dtype="bfloat16")
  batch = task.synthetic_batch(8, jax.random.key(0))
  s32, m32 = f32.train_step(builder.create_state(f32), {}, batch)
  s16, m16 = bf16.train_step(builder.create_state(bf16), {}, batch)
  assert np.isfinite(float(m16["train/loss"])) and np.isfinite(float(m16["train/grad_norm"]))
  for leaf in jax.tree.leaves(s16.params) + jax.tree.leaves(s16.opt_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  # bfloat16 keeps 8 bits of mantissa: the same loss to about 1e-2, the same gradient roughly.
  np.testing.assert_allclose(float(m16["train/loss"]), float(m32["train/loss"]), rtol=2e-2)
  np.testing.assert_allclose(float(m16["train/grad_norm"]), float(m32["train/grad_norm"]),
                             rtol=0.1)
  # It did compute in bfloat16 (the loss is ln(10) in both: the classifier starts at zero).
  assert float(m16["train/grad_norm"]) != float(m32["train/grad_norm"])


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
