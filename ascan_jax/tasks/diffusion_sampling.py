"""Sampling from the class-conditional diffusion task: the sample-based evaluators and the modes.

* ``SampleMetricsEvaluator`` (``config.evals.<name>.type = "diffusion_samples"``): draws
  ``num_samples`` class-balanced samples (EMA by default) and reports the judge's class accuracy
  and classifier-feature distance and/or FID, sFID, IS, precision and recall, writing the
  protocol beside the numbers in ``DIR/samples``. The samples are judged chunk by chunk where
  they were drawn (``Generator.chunks``; the judge and Inception run on the sharded arrays);
  only the first ``KEPT_SAMPLES`` are copied to the hosts, for the ``.png``/``.npz``.
* ``GridEvaluator`` (``type = "sample_grid"``): a sample grid every ``every_steps``.
* ``sample_mode``: ``--mode=sample`` (a grid, an ``.npz`` and the protocol).
* ``bench_sampling``: whole samples per second for ``--mode=bench``.
The generator itself (sharded, seeded per sample) is ``ascan_jax.diffusion.generate``.
"""
from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from ascan_jax import fileio
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import samplers
from ascan_jax.eval import generative_metrics

KEPT_SAMPLES = 100  # samples of a sample-based evaluation written to DIR/samples (.png, .npz).


def samples_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "diffusion_samples"
  c.every_steps = 10000
  c.prefix = "eval/"
  c.num_samples = 0  # samples generated per evaluation (0: this evaluator does nothing).
  c.judge_dir = ""  # a classification workdir whose classifier judges the samples.
  c.train_judge = False  # if judge_dir holds no finished run: train judge_config there first.
  c.judge_config = ""  # e.g. configs/ascan_t.py:runlocal (used with train_judge).
  c.inception_path = ""  # FID Inception safetensors (tools.convert_fid_inception) ...
  c.reference_path = ""  # ... and reference statistics .npz: FID, sFID, IS, prec./recall.
  c.real_samples = 1000  # real held-out images for the judge's feature statistics.
  return c


def grid_evaluator_schema() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.type = "sample_grid"
  c.every_steps = 5000
  return c


def grid_labels(config) -> np.ndarray:
  s = config.sample
  classes = list(s.classes) or list(range(min(config.data.num_classes, 10)))
  return np.repeat(np.asarray(classes, np.int32), s.per_class)


def _params(variants: dict, ema: bool):
  return variants["ema" if ema else "raw"][0]


class GridEvaluator:
  """A grid of ``sample.classes`` x ``sample.per_class`` samples in ``DIR/samples``."""

  def __init__(self, name: str, cfg, task, generator):
    self.name, self.every_steps = name, int(cfg.every_steps)
    self.task, self.generator = task, generator

  def run(self, inputs) -> dict:
    s = self.task.config.sample
    labels = grid_labels(self.task.config)
    images = self.generator(_params(inputs.variants, s.ema), labels, s.seed)
    if jax.process_index() == 0:
      gen = self.generator
      generate.write_outputs(
          fileio.join(inputs.workdir, "samples"),
          f"grid_step{inputs.step:07d}_{gen.tag(s.seed, s.ema)}", images, labels,
          gen.protocol(step=inputs.step, ema=s.ema, num_samples=len(labels), seed=s.seed),
          columns=s.per_class)
    return {}


class SampleMetricsEvaluator:
  """Metrics of class-balanced samples; see the module docstring."""

  def __init__(self, name: str, cfg, task, generator, judge_loader):
    self.name, self.every_steps, self.cfg = name, int(cfg.every_steps), cfg
    self.task, self.generator = task, generator
    self._judge_loader = judge_loader
    self._judge = None
    self._real_statistics = None  # (count, (mean, covariance)) of the judge's real features.
    self._inception = None

  def _load_judge(self):
    if self._judge is None:
      self._judge = self._judge_loader(self.cfg.judge_dir)
      size = self.task.config.data.image_size
      if self._judge.image_size != size:
        raise ValueError(f"the judge in {self.cfg.judge_dir} takes {self._judge.image_size}px "
                         f"images, the samples are {size}px")
      real = self._judge.real_features(limit=self.cfg.real_samples)
      self._real_statistics = (len(real), generative_metrics.feature_statistics(real))
    return self._judge

  def _load_inception(self):
    if self._inception is None:
      from ascan_jax.eval import inception_evaluator  # pylint: disable=g-import-not-at-top
      self._inception = inception_evaluator.InceptionEvaluator(self.cfg.inception_path,
                                                               self.cfg.reference_path)
    return self._inception

  def run(self, inputs) -> dict:
    e = self.cfg
    use_judge = bool(e.judge_dir)
    use_inception = bool(e.inception_path and e.reference_path)
    if e.num_samples <= 0 or not (use_judge or use_inception):
      return {}
    config = self.task.config
    s = config.sample
    num_classes = config.data.num_classes
    labels = np.arange(e.num_samples, dtype=np.int32) % num_classes
    seed = s.seed + 1  # not the grid's seed.
    gen = self.generator
    judge = self._load_judge() if use_judge else None
    inception = self._load_inception() if use_inception else None
    judged = judge.start() if judge else None
    measured = inception.start(len(labels)) if inception else None
    first = []  # the first KEPT_SAMPLES samples, for the files; the rest never leave the devices.
    kept = 0
    for chunk in gen.chunks(_params(inputs.variants, s.ema), labels, seed):
      if judge:
        judge.add(judged, chunk.images, chunk.labels, chunk.count)
      if inception:
        inception.add(measured, chunk.images, chunk.count)
      if kept < KEPT_SAMPLES:
        first.append(generate.leading_rows(chunk.images, min(chunk.count, KEPT_SAMPLES - kept)))
        kept += len(first[-1])
    protocol = gen.protocol(step=inputs.step, ema=s.ema, num_samples=len(labels), seed=seed)
    metrics = {}
    if judge:
      real_count, real_statistics = self._real_statistics
      judge_metrics = judge.finish(judged, real_statistics)
      metrics.update({f"{e.prefix}{k}": v for k, v in judge_metrics.items()})
      protocol.update(judge_dir=judge.workdir, judge_step=judge.step,
                      judge_real_samples=real_count)
    if inception:
      metrics.update({f"{e.prefix}{k}": v for k, v in inception.finish(measured).items()})
      protocol.update(inception.protocol(len(labels)))
    name = f"eval_step{inputs.step:07d}_{gen.tag(seed, s.ema)}"
    if jax.process_index() == 0:
      protocol["metrics"] = metrics
      images = np.concatenate(first)
      order = np.argsort(labels[:kept], kind="stable")
      generate.write_outputs(fileio.join(inputs.workdir, "samples"), name,
                             images[order], labels[:kept][order], protocol,
                             columns=max(1, min(10, len(order) // max(1, num_classes))))
    metrics[f"{e.prefix}sample_protocol"] = f"samples/{name}.json"
    metrics[f"{e.prefix}sample_nfe"] = gen.nfe()
    return metrics


def sample_mode(task, context, workdir: str) -> dict:
  """``--mode=sample``: a grid, an .npz and the protocol for ``sample.classes`` x seeds."""
  config = task.config
  s = config.sample
  params = context.state.ema_params if s.ema else context.state.params
  labels = grid_labels(config) if not s.classes else np.repeat(
      np.asarray(s.classes, np.int32), s.per_class)
  gen = task.generator(context.setup)
  images = gen(params, labels, s.seed, progress=jax.process_index() == 0)
  paths = {}
  if jax.process_index() == 0:
    protocol = gen.protocol(step=context.step, ema=s.ema, num_samples=len(labels), seed=s.seed)
    paths = generate.write_outputs(fileio.join(workdir, "samples"),
                                   f"sample_step{context.step:07d}_{gen.tag(s.seed, s.ema)}",
                                   images, labels, protocol, columns=s.per_class)
    print(f"wrote {len(labels)} samples: {paths['png']}, {paths['npz']}, {paths['json']}",
          flush=True)
    logging.info("samples: %s", paths)
  return paths


def bench_sampling(task, result: dict, make_context) -> dict:
  """Whole samples per second: NFE of the configured sampler, the rate implied by the measured
  forward throughput at the largest benchmarked batch and, with ``bench.measure_sampling``, a
  timed sampling run of that many samples (the paper's Table 4 uses batch 64)."""
  config = task.config
  s = config.sample
  nfe = samplers.nfe(s.sampler, s.steps, generate.guidance_schedule(s))
  batch = max(int(b) for b in result["inference"])
  fwd = result["inference"][str(batch)]["examples_per_second"]
  out = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
         "nfe_per_sample": nfe, "batch": batch,
         "samples_per_second_from_forward": fwd / nfe}
  if config.bench.measure_sampling:
    context = make_context()
    setup, state = context.setup, context.state
    gen = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params, batch)
    labels = np.arange(batch) % config.data.num_classes

    def draw(seed):
      for chunk in gen.chunks(state.params, labels, seed):
        chunk.images.block_until_ready()

    draw(0)  # compile
    t0 = time.perf_counter()
    draw(1)
    out["samples_per_second_measured"] = batch / (time.perf_counter() - t0)
  return out
