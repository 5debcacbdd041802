"""The segmentation task's evaluators, per-class tables and example picture.

* ``PerClassTables`` wraps an evaluator whose summary carries confusion matrices (the task's
  ``summarize_eval`` returns one as ``confusion``): it takes them out of the logged metrics
  (``metrics.jsonl`` keeps ``mIoU``, ``mAcc``, ``aAcc``, ``pixels``) and writes, on process 0,
  ``DIR/eval/<name>/per_class_step<N>.md`` (the per-class IoU/Acc table of every evaluated
  parameter set, ``eval.segmentation_metrics.per_class_table``) and ``confusion_step<N>.json``
  (rows: ground truth, columns: prediction).
  Every ``dataset`` entry of ``config.evals`` is a ``DatasetEvaluator`` wrapped this way.
* ``InferenceEvaluator`` (``config.evals.<name>.type = "segmentation_inference"``): the benchmark
  protocol at each image's original resolution with ``eval.segmentation_inference``: the test
  resize ``data.test_scale`` (mmseg ADE20K: long side <= 2048, short side 512), then whole-image
  (``mode="whole"``, padded to ``size_divisor``) or sliding-window (``mode="slide"``, ``crop``,
  ``stride``) inference, over ``scales`` and optionally flipped (multi-scale + flip averages the
  softmax probabilities). Each process predicts every ``P``-th record on its first local device
  with a process-local copy of the parameters, counts a numpy int64 confusion matrix at the
  original resolution, and the matrices are summed exactly over processes. Slow (one image at a
  time by default, many shapes to compile), so meant for the end of training and --mode=eval.
* ``example_picture``: ``--mode=sample``: rows of image | ground truth | prediction of held-out
  images (whole-image inference at the test resize) in ``DIR/segmentation_examples.png``.
"""
from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from ascan_jax import config_validation as cv
from ascan_jax import fileio
from ascan_jax import viz
from ascan_jax.data import sources
from ascan_jax.eval import evaluator as evaluator_lib
from ascan_jax.eval import segmentation_inference as inference
from ascan_jax.eval import segmentation_metrics
from ascan_jax.tasks import evaluators as evaluators_lib

INFERENCE_TYPE = "segmentation_inference"
CONFUSION = "confusion"
MODES = inference.MODES  # whole | slide


def inference_evaluator_schema() -> ml_collections.ConfigDict:
  """The exact (original-resolution) evaluator's keys; mmseg's ADE20K test settings."""
  c = ml_collections.ConfigDict()
  c.type = INFERENCE_TYPE
  c.every_steps = 160000
  c.prefix = "eval_ss/"  # metric names: <prefix><ema_?>mIoU, ...
  c.params = "raw"  # raw | ema | both
  c.split = ""  # empty: data.eval_split.
  c.mode = "whole"  # whole | slide
  c.scales = (1.0,)  # ratios of data.test_scale; (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) + flip: MS.
  c.flip = False
  c.size_divisor = 32  # whole: padding multiple (fewer compiled shapes when larger).
  c.crop = (512, 512)  # slide: window ...
  c.stride = (341, 341)  # ... and stride.
  c.batch_size = 1  # images (or windows) per forward call.
  c.images_per_call = 8  # images handed to the inference function at once (host memory).
  c.max_images = -1  # > 0: only the first N records (a quick look; not the benchmark).
  return c


def check_inference_config(e, key: str) -> None:
  cv.require(e.mode in MODES, f"{key}.mode", f"{e.mode!r} is not one of {MODES}")
  cv.require(len(e.scales) >= 1 and all(s > 0 for s in e.scales), f"{key}.scales",
             f"{tuple(e.scales)} must be positive ratios (at least one)")
  cv.require(e.size_divisor >= 1, f"{key}.size_divisor", "must be >= 1")
  for name in ("crop", "stride"):
    cv.require(len(tuple(e[name])) == 2 and min(e[name]) >= 1, f"{key}.{name}",
               f"{tuple(e[name])} must be two positive sizes")
  cv.require(e.batch_size >= 1 and e.images_per_call >= 1, f"{key}.batch_size",
             "batch_size and images_per_call must be >= 1")


def summarize_confusion(confusion) -> dict:
  """Scalar metrics of a summed confusion matrix, plus the matrix (int64) under ``confusion``."""
  cm = np.asarray(confusion, np.int64)
  m = segmentation_metrics.metrics_from_confusion(cm)
  return {"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"], "pixels": int(cm.sum()),
          CONFUSION: cm}


def write_tables(workdir: str, name: str, step: int, confusions: dict,
                 class_names) -> str | None:
  """``DIR/eval/<name>/per_class_step<N>.md`` (+ ``confusion_step<N>.json``) on process 0;
  ``confusions`` maps a metric prefix (``eval/``, ``eval/ema_``) to its matrix."""
  if not workdir or jax.process_index() != 0 or not confusions:
    return None
  directory = fileio.join(workdir, "eval", name)
  fileio.makedirs(directory)
  parts = [f"# {name}: per-class IoU and accuracy at step {step}\n"]
  for prefix, cm in confusions.items():
    metrics = segmentation_metrics.metrics_from_confusion(cm)
    parts.append(f"## {prefix} ({int(np.sum(cm))} pixels)\n")
    parts.append(segmentation_metrics.per_class_table(metrics, class_names))
  path = fileio.join(directory, f"per_class_step{step}.md")
  fileio.write_text(path, "\n".join(parts))
  fileio.write_text(fileio.join(directory, f"confusion_step{step}.json"),
                    json.dumps({"classes": list(class_names),
                                **{prefix: np.asarray(cm).tolist()
                                   for prefix, cm in confusions.items()}}))
  return path


class PerClassTables:
  """An evaluator whose confusion matrices become per-class table files; see the module
  docstring."""

  def __init__(self, inner, class_names):
    self.inner = inner
    self.name = inner.name
    self.every_steps = inner.every_steps
    self.class_names = tuple(class_names)

  def run(self, inputs: evaluator_lib.EvalInputs) -> dict:
    out = self.inner.run(inputs)
    confusions = {k[:-len(CONFUSION)]: np.asarray(out.pop(k)) for k in list(out)
                  if k.endswith(CONFUSION)}
    write_tables(inputs.workdir, self.name, inputs.step, confusions, self.class_names)
    return out


def local_copy(tree, device=None):
  """Every array of ``tree`` whole on one local device (default: the first), whatever its
  sharding: a replicated array is read from a local shard, one sharded over processes is
  gathered (a collective: every process must call this)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  device = device or jax.local_devices()[0]

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return jax.device_put(x, device)
    if x.is_fully_replicated:
      return jax.device_put(x.addressable_data(0), device)
    return jax.device_put(multihost_utils.process_allgather(x, tiled=True), device)

  return jax.tree.map(one, tree)


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
  """Exact int64 sum of a non-negative count array over processes (sent as two int32 halves,
  since JAX transfers 32-bit integers by default)."""
  counts = np.asarray(counts, np.int64)
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  high, low = np.divmod(counts, 1 << 30)
  gathered = multihost_utils.process_allgather(
      np.stack([high, low]).astype(np.int32))  # [P, 2, ...]
  gathered = np.asarray(gathered, np.int64)
  return (gathered[:, 0] << 30).sum(axis=0) + gathered[:, 1].sum(axis=0)


def logits_function(task):
  """``fn(variables, images float32 [B, h, w, 3] 0..255) -> logits``, jitted."""
  return jax.jit(lambda variables, images: task.forward(variables, {"image": images}))


def predict(task, fn, variables, images: list[np.ndarray], cfg) -> list[np.ndarray]:
  """int32 ``[H, W]`` predictions at the original resolutions, by ``cfg``'s protocol."""
  long_side, short_side = max(task.config.data.test_scale), min(task.config.data.test_scale)
  logits_fn = lambda batch: np.asarray(fn(variables, batch))
  view = dict(mode=cfg.mode, short_side=short_side, long_side=long_side,
              size_divisor=cfg.size_divisor, crop=tuple(cfg.crop), stride=tuple(cfg.stride),
              batch_size=cfg.batch_size)
  if len(cfg.scales) == 1 and not cfg.flip:
    scores = inference.view_scores(images, logits_fn, scale=float(cfg.scales[0]), **view)
    return [np.argmax(s, axis=-1).astype(np.int32) for s in scores]
  return inference.multi_scale_flip(images, logits_fn, tuple(cfg.scales), cfg.flip, **view)


class InferenceEvaluator:
  """The original-resolution evaluator; see the module docstring."""

  def __init__(self, task, name: str, cfg):
    self.task = task
    self.name = name
    self.cfg = cfg
    self.every_steps = int(cfg.every_steps)
    self.which = evaluator_lib.variants_for(cfg.params)
    self.split = cfg.split or task.config.data.eval_split
    self._fn = logits_function(task)

  def run(self, inputs: evaluator_lib.EvalInputs) -> dict:
    metrics, confusions = self.evaluate(inputs)
    write_tables(inputs.workdir, self.name, inputs.step, confusions, self.task.class_names())
    return metrics

  def evaluate(self, inputs: evaluator_lib.EvalInputs) -> tuple[dict, dict]:
    """``(metrics, {metric prefix: int64 confusion matrix summed over processes})``."""
    source = self.task.source(self.split)
    n = len(source) if self.cfg.max_images <= 0 else min(self.cfg.max_images, len(source))
    mine = list(range(jax.process_index(), n, jax.process_count()))
    k = self.task.num_classes
    out, confusions = {}, {}
    for variant in self.which:
      params, model_state = inputs.variants[variant]
      variables = local_copy({"params": params, **model_state})
      cm = np.zeros((k, k), np.int64)
      skipped = 0
      t0 = time.perf_counter()
      for start in range(0, len(mine), self.cfg.images_per_call):
        images, labels = [], []
        for i in mine[start:start + self.cfg.images_per_call]:
          try:
            example = source.load(i)
          except sources.RecordError as e:
            logging.warning("%s: skipping record %d: %s", self.name, i, e)
            skipped += 1
            continue
          images.append(example["image"])
          labels.append(example["segmentation"])
        if not images:
          continue
        for pred, label in zip(predict(self.task, self._fn, variables, images, self.cfg),
                               labels):
          cm += segmentation_metrics.confusion_matrix_host(pred, label, k)
      cm = sum_over_processes(cm)
      skipped = int(sum_over_processes(np.asarray([skipped]))[0])
      prefix = f"{self.cfg.prefix}{evaluator_lib.VARIANT_PREFIX[variant]}"
      summary = summarize_confusion(cm)
      confusions[prefix] = summary.pop(CONFUSION)
      for metric, value in summary.items():
        out[prefix + metric] = value
      out[prefix + "images"] = n - skipped
      out[prefix + "seconds"] = time.perf_counter() - t0
    return out, confusions


def build(task, setup) -> dict:
  """``{name: evaluator}`` for ``config.evals``: wrapped dataset evaluators and exact ones."""
  out = {}
  for name, ev in evaluators_lib.build_standard(task, setup).items():
    out[name] = PerClassTables(ev, task.class_names())
  for name in task.config.evals.keys():
    cfg = task.config.evals[name]
    if cfg.type == INFERENCE_TYPE:
      out[name] = InferenceEvaluator(task, name, cfg)
  return out


def palette(num_classes: int) -> np.ndarray:
  """uint8 ``[256, 3]`` class colours: black for class 0 when it is a background, distinct
  hues otherwise (fixed seed), grey for the ignore label and anything above the classes."""
  rng = np.random.default_rng(0)
  colors = np.full((256, 3), 128, np.uint8)
  hues = (np.arange(num_classes) * 0.61803398875) % 1.0
  for c in range(num_classes):
    h = hues[c] * 6.0
    x = 1.0 - abs(h % 2.0 - 1.0)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]
    value = 0.6 + 0.4 * rng.random()
    colors[c] = np.round(np.asarray(rgb) * 255 * value).astype(np.uint8)
  return colors


def example_picture(task, context, workdir: str) -> dict:
  """``--mode=sample``: held-out images | ground truth | prediction, one row each."""
  cfg = task.config
  split = cfg.sample.split or cfg.data.eval_split
  source = task.source(split)
  n = min(cfg.sample.num_images, len(source))
  state = context.state
  params, model_state = ((state.ema_params, state.ema_model_state) if cfg.sample.ema
                         else (state.params, state.model_state))
  variables = local_copy({"params": params, **model_state})
  examples = [source.load(i) for i in range(n)]
  whole = inference_evaluator_schema()
  preds = predict(task, logits_function(task), variables, [e["image"] for e in examples], whole)
  colors = palette(task.num_classes)
  names = task.class_names()
  tiles, captions, rows = [], [], []
  for i, (example, pred) in enumerate(zip(examples, preds)):
    label = example["segmentation"]
    cm = segmentation_metrics.confusion_matrix_host(pred, label, task.num_classes)
    metrics = segmentation_metrics.metrics_from_confusion(cm)
    present = sorted({names[c] for c in np.unique(label) if c < task.num_classes})
    tiles += [example["image"], colors[label], colors[pred]]
    captions += [f"#{i}", "truth: " + ", ".join(present[:6]),
                 f"prediction (aAcc {100 * metrics['aAcc']:.1f}%)"]
    rows.append({"index": i, "aAcc": metrics["aAcc"], "mIoU": metrics["mIoU"]})
  shapes = {t.shape for t in tiles}
  if len(shapes) > 1:  # images of different sizes: fit them into one cell size.
    from ascan_jax.data import segmentation_transforms as seg_ops  # pylint: disable=g-import-not-at-top
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    fit = seg_ops.fit_and_pad((h, w), 255, 0)
    tiles = [fit({"image": t, "segmentation": t[..., 0]}, None)["image"] for t in tiles]
  grid = viz.captioned_grid(np.stack(tiles), captions, columns=3, scale=cfg.sample.zoom)
  fileio.makedirs(workdir)
  path = fileio.join(workdir, "segmentation_examples.png")
  viz.save_png(path, grid)
  result = {"step": context.step, "path": path, "examples": rows, "split": split}
  fileio.write_text(fileio.join(workdir, "segmentation_examples.json"),
                    json.dumps(result, indent=2))
  print(f"wrote {path}", flush=True)
  return result
