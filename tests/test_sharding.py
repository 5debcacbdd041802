"""Data parallel, FSDP and tensor parallel are config changes that give 1-device losses.

Runs on the 8 fake CPU devices of conftest.py. Mixup/cutmix and stochastic depth are on, so the
randomness must also be independent of the layout. ``_config`` is also the model whose collectives
``tests/test_collectives.py`` budgets (the same compiled steps, shared through the compilation
cache).
"""
import jax
import numpy as np
import pytest

from ascan_jax import tasks
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.train import checkpoint as checkpoint_lib
from ascan_jax.train import builder
from configs import ascan_t

STEPS = 3


def _config(shape):
  c = ascan_t.get_config("runlocal")
  c.model.layout = "C-CT"
  c.model.widths = (16, 64)  # 4 heads of 16: the 4-way tensor axis splits them.
  c.model.stem_width = 16
  c.model.head_dim = 16
  c.model.embed_dim = 64
  c.model.drop_path_rate = 0.2
  c.augment.mixup_alpha = 0.8
  c.augment.cutmix_alpha = 1.0
  c.augment.mix_group_size = 2  # divides the 2 examples per device of the 8-way layouts.
  c.batch_size = 16
  c.total_steps = 10
  c.mesh.shape = shape
  return c


def _batches(task, n):
  return [task.synthetic_batch(16, jax.random.key(100 + i)) for i in range(n)]


def _run(shape, devices, steps=STEPS):
  c = _config(shape)
  task = tasks.get_task(c)
  mesh = mesh_lib.make_mesh(c, devices=devices)
  setup = builder.build(task, c, num_train_examples=4000, mesh=mesh)
  state = builder.create_state(setup)
  losses = []
  for batch in _batches(task, steps):
    state, metrics = setup.train_step(state, {}, jax.device_put(batch, setup.batch_shardings))
    losses.append(float(metrics["train/loss"]))
  return losses, state, setup


@pytest.fixture(scope="module")
def reference():
  return _run((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("shape,name", [((8, 1, 1), "data parallel"), ((1, 8, 1), "fsdp"),
                                        ((2, 1, 4), "tensor parallel"), ((2, 2, 2), "mixed")])
def test_layout_matches_single_device(reference, shape, name):
  ref_losses, ref_state, _ = reference
  losses, state, setup = _run(shape, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-6, err_msg=name)
  # Adam divides by sqrt(v): weights whose gradients are ~0 amplify rounding noise, hence atol.
  np.testing.assert_allclose(
      np.asarray(state.params["classifier"]["kernel"]),
      np.asarray(ref_state.params["classifier"]["kernel"]), rtol=1e-3, atol=3e-5)
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
  if name == "fsdp":
    assert any("fsdp" in str(s) for s in specs), "FSDP must shard some parameters"
  if name == "tensor parallel":
    assert any("tensor" in str(s) for s in specs), "TP must shard some parameters"
  if name == "data parallel":
    assert all(all(a is None for a in s) for s in specs), "data parallel replicates params"


def test_restore_onto_a_different_number_of_devices(tmp_path):
  _, state8, setup8 = _run((8, 1, 1), jax.devices(), steps=2)
  c = _config((8, 1, 1))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), c, best_metric="eval/top1")
  meta = {"param_shapes": checkpoint_lib.param_shapes(state8.params), "process_count": 1}
  ckpt.save(2, state8, meta, force=True)
  ckpt.wait()
  saved = jax.tree.map(np.asarray, jax.device_get(state8.params))
  task = tasks.get_task(c)
  batch = _batches(task, 3)[2]
  _, m8 = setup8.train_step(state8, {}, jax.device_put(batch, setup8.batch_shardings))
  for devices, shape in ((jax.devices()[:2], (2, 1, 1)), (jax.devices()[:1], (1, 1, 1))):
    c2 = _config(shape)
    setup = builder.build(task, c2, 4000, mesh=mesh_lib.make_mesh(c2, devices=devices))
    restored, _ = ckpt.restore(2, setup.abstract_state)
    assert int(restored.step) == 2
    for leaf in jax.tree.leaves(restored.params):
      assert leaf.sharding.device_set == set(devices)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved)
    _, m = setup.train_step(restored, {}, jax.device_put(batch, setup.batch_shardings))
    np.testing.assert_allclose(float(m["train/loss"]), float(m8["train/loss"]), rtol=2e-5)
  ckpt.close()


def test_checkpoint_from_another_model_is_refused(tmp_path):
  _, state, _ = _run((1, 1, 1), jax.devices()[:1], steps=1)
  c = _config((1, 1, 1))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), c, best_metric="eval/top1")
  ckpt.save(1, state, {"param_shapes": checkpoint_lib.param_shapes(state.params),
                             "process_count": 1}, force=True)
  ckpt.wait()
  other = _config((1, 1, 1))
  other.model.widths = (16, 96)
  task = tasks.get_task(other)
  setup = builder.build(task, other, 4000, mesh=mesh_lib.make_mesh(other, jax.devices()[:1]))
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"different model: .*stage2.*checkpoint \(.*\) vs model"):
    ckpt.restore(1, setup.abstract_state)
  ckpt.close()
