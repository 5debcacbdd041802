"""Warm starts (``config.init_from``): a 224 classifier starts a 288 one with its relative
position tables resized; include/exclude/rename; shape mismatches named."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ascan_jax.models import attention
from ascan_jax.modes import train as train_mode
from ascan_jax.tasks import classification
from ascan_jax.train import builder
from ascan_jax.train import init_from


def test_resized_tables_keep_offset_zero_and_an_unchanged_grid_is_the_identity():
  table = jax.random.normal(jax.random.key(0), (3, 13, 13))  # a 7x7 grid.
  same = attention.resize_relative_position_table(table, 7, 7)
  np.testing.assert_array_equal(same, table)
  for h, w in ((9, 9), (5, 5), (9, 4)):
    bigger = attention.resize_relative_position_table(table, h, w)
    assert bigger.shape == (3, 2 * h - 1, 2 * w - 1)
    np.testing.assert_allclose(bigger[:, h - 1, w - 1], table[:, 6, 6], rtol=1e-6)


def _config(size: int, **model):
  c = classification.default_config()
  c.model.update({**dict(layout="C-CT-CT-CT", widths=(8, 16, 16, 16), stem_width=8,
                         embed_dim=16, head_dim=8, drop_path_rate=0.0, dtype="float32",
                         table_image_size=size), **model})
  c.data.update(dict(name="embedded_digits", num_classes=10, image_size=size))
  c.augment.update(dict(randaugment_layers=0, color_jitter=0.0, mixup_alpha=0.0,
                        cutmix_alpha=0.0, flip=False))
  c.batch_size = c.eval_batch_size = 8
  c.total_epochs, c.total_steps = 0.0, 2
  c.optim.warmup_steps = 1
  c.evals = ml_collections.ConfigDict()
  c.log.tensorboard = False
  c.checkpoint.every_steps = 2
  return c


def _fresh(task, config):
  setup = builder.build(task, config, None)
  return setup, builder.create_state(setup)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("classifier224")
  config = _config(224)
  state = train_mode.train(classification.Task(config), config, str(workdir))
  return str(workdir), jax.device_get(state)


def test_a_224_classifier_warm_starts_a_288_one(source_run, tmp_path):
  workdir, source = source_run
  config = _config(288)
  with config.unlocked():
    config.init_from.workdir = workdir
  task = classification.Task(config)
  setup, fresh = _fresh(task, config)
  state, report = init_from.warm_start(fresh, setup.state_shardings, config.init_from,
                                       setup.mesh, str(tmp_path))
  tables = [r for r in report.resized if r[0].endswith("rel_pos/table")]
  assert len(tables) == 3  # one T block in each of stages 2-4.
  assert tables[0][1] != tables[0][2]
  assert not report.not_loaded and not report.unused and report.step == 2
  assert json.loads((tmp_path / "init_from.json").read_text())["step"] == 2
  # Every other parameter is the source's EMA value; raw and EMA start equal; the step is 0.
  np.testing.assert_array_equal(state.params["classifier"]["kernel"],
                                source.ema_params["classifier"]["kernel"])
  np.testing.assert_array_equal(state.ema_params["stem_conv1"]["kernel"],
                                source.ema_params["stem_conv1"]["kernel"])
  assert int(state.step) == 0
  # The resized tables are what the 224 model itself uses at 288 (its run-time resize): the
  # warm-started 288 model computes the same logits as the 224 model run on 288 images.
  images = jax.random.randint(jax.random.key(1), (2, 288, 288, 3), 0, 256).astype(jnp.uint8)
  warm = task.forward({"params": state.params, **state.model_state}, {"image": images})
  old_task = classification.Task(_config(224))
  old = old_task.forward({"params": source.ema_params, **source.ema_model_state},
                         {"image": images})
  np.testing.assert_allclose(warm, old, rtol=1e-5, atol=1e-5)


def test_the_288_run_trains_from_the_warm_start(source_run, tmp_path):
  workdir, _ = source_run
  config = _config(288)
  with config.unlocked():
    config.init_from.workdir = workdir
  run = tmp_path / "run288"
  train_mode.train(classification.Task(config), config, str(run))
  assert sorted(os.listdir(run / "checkpoints"))[-1] == "2"
  assert json.loads((run / "init_from.json").read_text())["loaded"]


def test_a_shape_mismatch_names_the_parameters_unless_excluded(source_run):
  workdir, _ = source_run
  config = _config(224, embed_dim=24)
  with config.unlocked():
    config.init_from.workdir = f"{workdir}:2"
  task = classification.Task(config)
  setup, fresh = _fresh(task, config)
  with pytest.raises(init_from.InitFromError, match=r"head_conv/kernel.*\(1, 1, 16, 16\) vs "
                                                    r"model \(1, 1, 16, 24\)"):
    init_from.warm_start(fresh, setup.state_shardings, config.init_from, setup.mesh)
  with config.unlocked():
    config.init_from.exclude = r"^(head_conv|head_bn|classifier)/"
  state, report = init_from.warm_start(fresh, setup.state_shardings, config.init_from,
                                       setup.mesh)
  assert "head_conv/kernel" in report.not_loaded and "classifier/kernel" in report.not_loaded
  assert "state:batch_stats/head_bn/mean" in report.not_loaded
  assert "head_conv/kernel" in report.filtered
  np.testing.assert_array_equal(state.params["head_conv"]["kernel"],
                                fresh.params["head_conv"]["kernel"])


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
  with pytest.raises(init_from.InitFromError, match="no checkpoint found"):
    init_from.checkpoint_location(str(tmp_path / "nowhere"))


def test_rename_include_and_unused():
  cfg = ml_collections.ConfigDict(dict(include="", exclude="^classifier/",
                                       rename=(("^", "backbone/"),), resize_tables=True))
  src = {"stem/kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
         "classifier/kernel": jax.ShapeDtypeStruct((4, 10), jnp.float32),
         "extra/bias": jax.ShapeDtypeStruct((4,), jnp.float32)}
  dst = {"backbone/stem/kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
         "decode_head/kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
  report = init_from.Report("x", 0, "ema")
  plan, errors = init_from._plan(src, dst, cfg, report, "")
  assert plan == {"backbone/stem/kernel": ("stem/kernel", False)} and not errors
  assert report.filtered == ["classifier/kernel"] and report.unused == ["extra/bias"]
  assert report.not_loaded == ["decode_head/kernel"]
