"""The segmentation task: a tiny UperNet-AsCAN warm-started from a classifier trains on digit
scenes through the generic loop and evaluates on 8 devices; its confusion matrix equals a numpy
reference (canvas evaluator, original-resolution evaluator, 2 processes); a mismatched classifier
checkpoint is refused with the parameter names; the ADE20K configs validate and summarise at 512².
(Metric formulas, inference modes and the data ops have their own tests: test_segmentation_*.)"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ascan_jax import config_validation
from ascan_jax import tasks
from ascan_jax.data import segmentation_transforms as seg_ops
from ascan_jax.data import sources
from ascan_jax.eval import evaluator as evaluator_lib
from ascan_jax.eval import segmentation_metrics
from ascan_jax.models import ascan
from ascan_jax.modes import summary as summary_lib
from ascan_jax.modes import train as train_mode
from ascan_jax.tasks import classification
from ascan_jax.tasks import segmentation
from ascan_jax.tasks import segmentation_evaluators as seg_evaluators
from ascan_jax.train import builder
from ascan_jax.train import init_from
from tests import helpers

TINY_BACKBONE = dict(layout="C-CT-CT-CT", widths=(8, 16, 16, 16), stem_width=8, head_dim=8,
                     drop_path_rate=0.1, dtype="float32")
SIZE = 32
EVAL_SCENES = 20  # eval batch 8: the last batch holds 4 padding examples.


def _classifier_config():
  c = classification.default_config()
  c.model.update(dict(TINY_BACKBONE, embed_dim=16, table_image_size=16))
  c.data.update(dict(name="embedded_digits", num_classes=10, image_size=16))
  c.augment.update(dict(randaugment_layers=0, color_jitter=0.0, mixup_alpha=0.0,
                        cutmix_alpha=0.0, flip=False))
  c.batch_size = c.eval_batch_size = 8
  c.total_epochs, c.total_steps = 0.0, 1
  c.optim.warmup_steps = 0
  c.evals = ml_collections.ConfigDict()
  c.log.tensorboard = False
  c.checkpoint.every_steps = 1
  return c


def _config(classifier_dir: str = "", **model):
  c = segmentation.default_config()
  c.model.update(dict(TINY_BACKBONE, table_image_size=SIZE, feature_stages=(1, 2, 3, 4),
                      channels=16, aux_channels=8, **model))
  c.data.update(dict(name="embedded_digit_scenes", num_classes=11, scene_size=SIZE,
                     train_scenes=64, eval_scenes=EVAL_SCENES, crop_size=(SIZE, SIZE),
                     eval_size=(SIZE, SIZE), scale=(4 * SIZE, SIZE), test_scale=(4 * SIZE, SIZE),
                     ratio_range=(0.5, 2.0)))  # the whole mmseg pipeline, cat_max_ratio too.
  c.batch_size = c.eval_batch_size = 8
  c.total_steps = 2
  c.optim.warmup_steps = 1
  c.optim.ema_decay = 0.5
  c.evals.val.every_steps = 2
  c.evals.val.params = "both"
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.checkpoint.every_steps = 2
  c.init_from.workdir = classifier_dir
  c.init_from.rename = (("^", "backbone/"),)
  c.init_from.exclude = r"^(head_conv|head_bn|classifier)/"
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-step classifier, then 2 segmentation steps warm-started from it, on 8 devices."""
  root = tmp_path_factory.mktemp("segmentation")
  cls_config = _classifier_config()
  train_mode.train(classification.Task(cls_config), cls_config, str(root / "classifier"))
  config = _config(str(root / "classifier"))
  tasks.validate(config, num_devices=jax.device_count())
  task = segmentation.Task(config)
  state = train_mode.train(task, config, str(root / "seg"))
  return config, task, state, root


def test_trains_warm_started_and_evaluates_through_the_loop(trained):
  config, task, state, root = trained
  rows = helpers.read_jsonl(root / "seg" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  last = rows[-1]
  # Every pixel of the 20 held-out scenes counted once (the 4 padding examples nowhere); the
  # matrix itself went to the per-class table, not into metrics.jsonl.
  assert last["eval/pixels"] == last["eval/ema_pixels"] == EVAL_SCENES * SIZE * SIZE
  assert 0.0 <= last["eval/mIoU"] <= 1.0 and 0.0 <= last["eval/aAcc"] <= 1.0
  assert not any("confusion" in k for k in last)
  table = (root / "seg" / "eval" / "val" / "per_class_step2.md").read_text()
  assert all(f"| {name} |" in table for name in task.class_names())
  assert "## eval/ " in table and "## eval/ema_ " in table
  saved = json.loads((root / "seg" / "eval" / "val" / "confusion_step2.json").read_text())
  assert np.sum(saved["eval/"]) == EVAL_SCENES * SIZE * SIZE
  # The backbone came from the classifier (renamed, tables resized 16 -> 32, BatchNorm
  # statistics too); the heads were left at their initial values.
  report = json.loads((root / "seg" / "init_from.json").read_text())
  loaded = dict(map(tuple, report["loaded"]))
  assert loaded["stem_conv1/kernel"] == "backbone/stem_conv1/kernel"
  assert loaded["state:batch_stats/stem_bn1/mean"] == "state:batch_stats/backbone/stem_bn1/mean"
  # Tables follow the stage grids: 16 -> 32 pixels is [4, 2, 1, 1] -> [8, 4, 2, 1], so the T
  # blocks of stages 2 and 3 are resized (3 -> 7, 1 -> 3 rows) and stage 4's 1x1 grid is not.
  grids = {size: ascan.stage_grids(size, 4) for size in (16, SIZE)}
  expected = {f"backbone/stage{s}_block2_T/attention/rel_pos/table":
              (2 * grids[16][s - 1] - 1, 2 * grids[SIZE][s - 1] - 1)
              for s in (2, 3, 4) if grids[16][s - 1] != grids[SIZE][s - 1]}
  assert {name: (old[1], new[1]) for name, old, new in report["resized"]} == expected
  assert len(expected) == 2 and "head_conv/kernel" in report["filtered"]
  assert report["not_loaded"] and all(n.split("/")[0] in ("decode_head", "auxiliary_head") or
                                      n.split("/")[1] in ("decode_head", "auxiliary_head")
                                      for n in report["not_loaded"])


def _reference_confusion(task, variables, images, labels):
  """Numpy confusion of per-image predictions on one device, and how many pixels are near-ties
  (top-2 logits closer than 1e-4: float rounding may flip those, each moving 2 cells by 1)."""
  fn = jax.jit(lambda v, x: task.forward(v, {"image": x}))
  # A device of this process: jax.devices()[0] belongs to process 0, so in any other process
  # the "reference" would be a global array that this process cannot read.
  variables = jax.device_put(jax.device_get(variables), jax.local_devices()[0])
  k = task.num_classes
  cm, ties = np.zeros((k, k), np.int64), 0
  for image, label in zip(images, labels):
    logits = np.asarray(fn(variables, image[None]))[0]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    ties += int(np.sum(top2[..., 1] - top2[..., 0] < 1e-4))
    cm += segmentation_metrics.confusion_matrix_host(np.argmax(logits, -1), label, k)
  return cm, ties


def _held_out(task):
  src = task.source("validation")
  examples = [src.load(i) for i in range(len(src))]
  return [e["image"] for e in examples], [e["segmentation"] for e in examples]


def _assert_close_counts(cm, ref, ties):
  assert cm.sum() == ref.sum()
  assert np.abs(cm - ref).sum() <= 2 * ties, (np.abs(cm - ref).sum(), ties)


def test_canvas_evaluator_on_8_devices_equals_numpy_reference(trained):
  config, task, state, root = trained
  setup = builder.build(task, config, None)
  ev = task.make_evaluators(setup)["val"]
  assert isinstance(ev, seg_evaluators.PerClassTables)
  out = ev.inner.run(evaluator_lib.EvalInputs(train_mode.variants(state), setup.frozen, 2, ""))
  images, labels = _held_out(task)
  for prefix, params, model_state in (("eval/", state.params, state.model_state),
                                      ("eval/ema_", state.ema_params, state.ema_model_state)):
    ref, ties = _reference_confusion(task, {"params": params, **model_state}, images, labels)
    _assert_close_counts(np.asarray(out[prefix + "confusion"]), ref, ties)
    assert out[prefix + "pixels"] == EVAL_SCENES * SIZE * SIZE
    assert out[prefix + "mIoU"] == pytest.approx(
        segmentation_metrics.metrics_from_confusion(out[prefix + "confusion"])["mIoU"])


def test_original_resolution_evaluator_equals_numpy_reference(trained, tmp_path):
  """Scenes already at the test scale: whole-image inference sees them as they are."""
  config, task, state, _ = trained
  cfg = seg_evaluators.inference_evaluator_schema()
  cfg.params = "ema"
  ev = seg_evaluators.InferenceEvaluator(task, "ss", cfg)
  out = ev.run(evaluator_lib.EvalInputs(train_mode.variants(state), {}, 7, str(tmp_path)))
  images, labels = _held_out(task)
  ref, ties = _reference_confusion(
      task, {"params": state.ema_params, **state.ema_model_state}, images, labels)
  saved = np.asarray(json.loads(
      (tmp_path / "eval" / "ss" / "confusion_step7.json").read_text())["eval_ss/ema_"])
  _assert_close_counts(saved, ref, ties)
  assert out["eval_ss/ema_images"] == EVAL_SCENES
  assert out["eval_ss/ema_pixels"] == EVAL_SCENES * SIZE * SIZE


def test_two_processes_give_the_one_device_confusion_matrices(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.test_segmentation_task", str(port),
                             str(pid)], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  for r in results:
    for name in ("canvas", "exact"):
      cm, ref = np.asarray(r[name]), np.asarray(r["reference"])
      _assert_close_counts(cm, ref, r["ties"])
  assert results[0]["canvas"] == results[1]["canvas"]
  assert results[0]["exact"] == results[1]["exact"]


def _distributed_main():
  """One process of a 2-process evaluation (2 devices each) of a freshly initialised model:
  prints both evaluators' confusion matrices and a one-device numpy reference."""
  port, pid = sys.argv[1], int(sys.argv[2])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  config = _config()
  config.evals.val.params = "raw"
  config.evals.exact = seg_evaluators.inference_evaluator_schema()
  task = segmentation.Task(config)
  setup = builder.build(task, config, None)
  state = builder.create_state(setup)
  evaluators = task.make_evaluators(setup)
  inputs = evaluator_lib.EvalInputs(train_mode.variants(state), setup.frozen, 0, "")
  canvas = evaluators["val"].inner.run(inputs)["eval/confusion"]
  exact = evaluators["exact"].evaluate(inputs)[1]["eval_ss/"]
  variables = seg_evaluators.local_copy({"params": state.params, **state.model_state})
  ref, ties = _reference_confusion(task, variables, *_held_out(task))
  print(json.dumps({"canvas": np.asarray(canvas).tolist(), "exact": exact.tolist(),
                    "reference": ref.tolist(), "ties": ties}), flush=True)


def test_a_mismatched_classifier_checkpoint_is_refused_with_the_names(trained):
  _, _, _, root = trained
  config = _config(str(root / "classifier"), widths=(8, 16, 16, 24))
  task = segmentation.Task(config)
  setup = builder.build(task, config, None)
  fresh = builder.create_state(setup)
  # Stage 4 widens 16 -> 24: its C block expands its 16 inputs as before (expand_conv keeps
  # (3, 3, 16, 64)) but projects to 24 channels, and its T block is 24 wide throughout.
  with pytest.raises(init_from.InitFromError) as refused:
    init_from.warm_start(fresh, setup.state_shardings, config.init_from, setup.mesh)
  message = str(refused.value)
  for name, old, new in (
      ("stage4_block1_C/project_conv/kernel", (1, 1, 64, 16), (1, 1, 64, 24)),
      ("stage4_block2_T/mlp_in/kernel", (16, 64), (24, 96)),
      ("state:batch_stats/stage4_block1_C/project_bn/mean", (16,), (24,))):
    renamed = name.replace("stage4", "backbone/stage4")
    assert f"{name} -> {renamed}: checkpoint {old} vs model {new}" in message, message
  assert "expand_conv" not in message and "stage3_" not in message
  with config.unlocked():  # without the rename nothing matches: one error saying so.
    config.init_from.rename = ()
  with pytest.raises(init_from.InitFromError, match="nothing of .* matches this model"):
    init_from.warm_start(fresh, setup.state_shardings, config.init_from, setup.mesh)


def test_sample_mode_draws_image_truth_and_prediction(trained, tmp_path):
  config, task, state, _ = trained
  setup = builder.build(task, config, None)
  result = task.sample(builder.RunContext(setup, state, 2), str(tmp_path))
  from PIL import Image
  with Image.open(tmp_path / "segmentation_examples.png") as im:
    width, height = im.size
  assert width >= 3 * SIZE * config.sample.zoom and height >= 3 * SIZE
  assert len(result["examples"]) == config.sample.num_images


@pytest.mark.parametrize("variant", ["t", "b", "l"])
def test_ade20k_configs_validate(variant):
  from configs import segmentation_common
  config = segmentation_common.get_config(variant.upper(), None)
  tasks.validate(config, num_devices=8)
  assert config.optim.peak_lr == 1e-4 and config.optim.weight_decay == 0.05
  assert config.total_steps == 160000 and config.batch_size == 16
  assert tuple(config.data.crop_size) == (512, 512) and config.optim.warmup_steps == 1500
  assert config.optim.schedule == "poly" and tuple(config.model.feature_stages) == (2, 3, 4)


def test_runlocal_config_trains_its_classifier_first_when_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("ASCAN_CACHE", str(tmp_path))
  from configs import segmentation_common
  config = segmentation_common.get_config("T", "runlocal")
  tasks.validate(config, num_devices=1)
  task = segmentation.Task(config)
  (prereq_config, workdir), = task.prerequisites()
  assert prereq_config.task == "classification" and workdir == config.init_from.workdir
  assert workdir.startswith(str(tmp_path))
  # Its backbone is the one the segmentation model expects (same names, same shapes).
  assert tuple(prereq_config.model.widths) == tuple(config.model.widths)
  assert prereq_config.model.layout == config.model.layout


@pytest.mark.parametrize("key,value,match", [
    ("model.feature_stages", (2, 5), "model.feature_stages"),
    ("model.aux_stage", 7, "model.aux_stage"),
    ("data.num_classes", 12, "digit scenes have 11 classes"),
    ("loss.normalize", "mean", "loss.normalize"),
    ("backbone_pretrain.config", "", "backbone_pretrain.config"),
])
def test_impossible_values_are_named(key, value, match):
  from configs import segmentation_common
  config = segmentation_common.get_config("T", "runlocal")
  section, name = key.split(".")
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError, match=match):
    tasks.validate(config, num_devices=1)


def test_missing_ade20k_says_how_to_prepare_it(tmp_path):
  from configs import segmentation_common
  config = segmentation_common.get_config("T", None)
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(sources.DatasetNotFoundError, match="ade20k_to_array_record"):
    segmentation.Task(config).num_train_examples()


def test_tfds_scene_parse150_needs_consent_then_a_prepared_dataset(tmp_path):
  """tfds's scene_parse150 carries instance maps only: refused unless asked for, then a missing
  dataset says how to build it."""
  from configs import segmentation_common
  config = segmentation_common.get_config("T", None)
  config.data.name = "scene_parse150"
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match="instance annotations"):
    segmentation.Task(config).num_train_examples()
  config.data.accept_instance_annotations = True
  with pytest.raises(sources.DatasetNotFoundError, match="tfds build scene_parse150"):
    segmentation.Task(config).num_train_examples()


def test_summary_at_512_shapes_only():
  """UperNet-AsCAN-T at 512x512: abstract parameters and logits (eval_shape, no compile)."""
  from configs import segmentation_common
  config = segmentation_common.get_config("T", None)
  task = segmentation.Task(config)
  model = task.build_model(attention_impl="xla")
  variables = summary_lib.abstract_variables(task, model)
  groups = summary_lib.params_by_prefix(variables["params"])
  assert set(groups) == {"backbone", "decode", "auxiliary"}
  # The backbone is the T classifier (tables for 512) without its head and classifier.
  cls_config = classification.default_config()
  cls_config.model.table_image_size = 512
  cls_task = classification.Task(cls_config)
  cls_params = summary_lib.abstract_variables(cls_task, cls_task.model)["params"]
  head = ("head_conv", "head_bn", "classifier")
  assert groups["backbone"] == sum(int(x.size) for k, v in cls_params.items() if k not in head
                                   for x in jax.tree.leaves(v))
  assert 20e6 < groups["decode"] < 30e6  # UperNet's 512-channel head (mmseg: about 25M).
  spec = task.input_spec(1, train=False)
  assert spec["image"].shape == (1, 512, 512, 3)
  logits = jax.eval_shape(lambda v, b: task.forward(v, b, model), variables, spec)
  assert logits.shape == (1, 512, 512, 150) and logits.dtype == jnp.float32


def test_summary_mode_counts_a_tiny_model():
  """The whole --mode=summary on the tiny model (features-only backbone: no embed_dim)."""
  config = _config()
  # MACs and parameters only (large inputs, small hosts); the memory analysis itself is
  # test_summary_bench's (it compiles a training step: seconds even for this model).
  config.summary.memory_batch_size = 0
  task = segmentation.Task(config)
  out = summary_lib.summarize(task, config)
  assert out["params"] == sum(out["params_by_group"].values()) > 0
  assert out["embed_dim"] is None and out["input_shapes"]["image"] == [SIZE, SIZE, 3]
  assert out["macs"] > 0 and "train_temp_bytes" not in out and "inference_temp_bytes" not in out
  assert "MACs / example" in summary_lib.format_table(out)


def test_bench_mode_measures_frames_per_second_of_a_tiny_model():
  """--mode=bench on the segmentation task (no data.image_size: the input shape is reported)."""
  from ascan_jax.modes import bench  # pylint: disable=g-import-not-at-top
  config = _config()
  config.bench.batch_sizes = (1,)
  config.bench.train_batch_size = 0
  config.bench.update(dict(warmup=1, repeats=2, min_seconds=0.0))
  out = bench.run_benchmark(segmentation.Task(config), config)
  assert out["input_shapes"]["image"] == [SIZE, SIZE, 3] and out["image_size"] is None
  assert out["inference"]["1"]["examples_per_second"] > 0


def test_fit_and_pad_keeps_image_and_labels_aligned():
  """A 64x128 record fitted into 32x32 (factor 1/4, 16 rows of padding). The labels are constant
  on aligned 4x4 blocks, so the bilinear image (mean of source pixels 4i+1, 4i+2) and the nearest
  labels (source pixel 4i) see the same block: image == labels x 40 exactly wherever they are
  aligned. (Per-pixel random labels could not test this: bilinear mixes neighbouring values.)"""
  rng = np.random.default_rng(0)
  seg = np.kron(rng.integers(0, 5, size=(16, 32)), np.ones((4, 4), np.int64)).astype(np.uint8)
  image = np.repeat(seg[..., None] * 40, 3, axis=-1).astype(np.uint8)
  out = seg_ops.fit_and_pad((32, 32), 7, 255)({"image": image, "segmentation": seg}, None)
  assert out["image"].shape == (32, 32, 3) and out["segmentation"].shape == (32, 32)
  assert (out["segmentation"][16:] == 255).all() and (out["image"][16:] == 7).all()
  np.testing.assert_array_equal(out["segmentation"][:16], seg[::4, ::4])
  np.testing.assert_array_equal(out["image"][:16, :, 0], out["segmentation"][:16] * 40)


def test_host_confusion_matrix_equals_the_device_one():
  rng = np.random.default_rng(1)
  label = rng.choice([0, 1, 2, 3, 255], size=(3, 9, 7))
  pred = rng.integers(0, 4, size=label.shape)
  device = segmentation_metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 4)
  host = segmentation_metrics.confusion_matrix_host(pred, label, 4)
  assert host.dtype == np.int64
  np.testing.assert_array_equal(host, np.asarray(device))


if __name__ == "__main__":
  sys.path.insert(0, helpers.REPO)
  _distributed_main()
