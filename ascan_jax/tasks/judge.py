"""A trained classifier that judges generated images, when no standard feature network applies.

For datasets without a standard evaluator here (the embedded MNIST digits; no Inception weights
can be downloaded), the classifier the classification task trains on the same data judges the
samples: the share of samples it assigns to the class they were generated for
(``sample_class_accuracy``) and the Fréchet distance between generated and real images in its
pooled pre-logits feature space (``fd_classifier``, FID's formula with this classifier in place
of Inception).

``Judge.from_workdir(DIR)`` rebuilds the classifier from ``DIR/config.json`` and restores the EMA
parameters of its latest checkpoint. Training the judge when it is missing is a *prerequisite*
run (``Task.prerequisites``; the modes train it first, see ``ascan_jax.modes.prerequisites``),
so nothing here trains. ``is_trained(config, DIR)`` says whether that run has finished.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ascan_jax import fileio
from ascan_jax import tasks
from ascan_jax.diffusion import generate
from ascan_jax.eval import generative_metrics
from ascan_jax.tasks import classification
from ascan_jax.train import builder
from ascan_jax.train import checkpoint as checkpoint_lib


def is_trained(config, workdir: str) -> bool:
  """Whether the classification run ``config`` has finished in ``workdir``."""
  from ascan_jax.train import optim  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(workdir, config, best_metric="", read_only=True)
  latest = ckpt.latest_step()
  ckpt.close()
  if latest is None:
    return False
  total = optim.resolve_durations(config, None).total_steps if config.total_steps > 0 else None
  if total is None:
    task = tasks.get_task(config)
    total = optim.resolve_durations(config, task.num_train_examples()).total_steps
  return latest >= total


@dataclasses.dataclass
class JudgeStatistics:
  """What ``Judge.add`` accumulates over the chunks of one sample set."""
  correct: int
  count: int
  features: generative_metrics.MomentAccumulator


class Judge:
  """Predicts (logits, pooled features) of uint8 NHWC images with a trained classifier.

  ``predict`` takes numpy images of this process (one local device). ``start`` / ``add`` /
  ``finish`` judge samples where they were drawn: ``add`` takes one chunk as global arrays
  split over a mesh (the diffusion generator's output) and runs the classifier under one
  ``jax.jit`` on those shards, with the weights replicated over the same mesh; only the number
  of correct predictions (an exact integer sum) and the features' float32 mean and centred
  second moment leave the devices (``generative_metrics.masked_moments``, merged in float64).
  The weights are an argument of the jitted functions, never constants baked into them.
  """

  def __init__(self, task, variables, step: int, workdir: str):
    self.task = task
    self.step = step
    self.workdir = workdir
    self.image_size = task.config.data.image_size
    self.num_classes = task.config.data.num_classes
    self._variables = jax.device_get(variables)
    self._local_variables = None
    self._replicated = {}  # mesh -> the weights replicated over it
    self._steps = {}  # mesh -> jitted chunk statistics
    model = task.model

    def embed(variables, images):
      if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
      logits, emb = model.apply(variables, classification.normalize(images), train=False,
                                return_embedding=True)
      return logits.astype(jnp.float32), emb.astype(jnp.float32)

    self._embed = embed
    self._predict = jax.jit(embed)

  def _check_images(self, shape) -> None:
    if len(shape) != 4 or tuple(shape[1:3]) != (self.image_size, self.image_size):
      raise ValueError(f"the judge in {self.workdir} expects [N, {self.image_size}, "
                       f"{self.image_size}, C] images, got {tuple(shape)}")

  @classmethod
  def from_workdir(cls, workdir: str, use_ema: bool = True) -> "Judge":
    path = fileio.join(workdir, "config.json")
    if not fileio.exists(path):
      raise FileNotFoundError(f"no judge classifier in {workdir!r} (missing config.json); train "
                              "one with the classification task first")
    config, _ = tasks.config_from_saved(json.loads(fileio.read_text(path))["config"])
    task = tasks.get_task(config)
    context = builder.restore(task, config, workdir)
    step, state = context.step, context.state
    params = state.ema_params if use_ema else state.params
    model_state = state.ema_model_state if use_ema else state.model_state
    variables = jax.device_get({"params": params, **model_state})
    return cls(task, variables, step, workdir)

  def predict(self, images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    self._check_images(images.shape)
    if self._local_variables is None:
      self._local_variables = jax.device_put(self._variables, jax.local_devices()[0])
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:  # one compiled shape for every batch.
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out_logits, out_feats = jax.device_get(
          self._predict(self._local_variables, jnp.asarray(chunk, jnp.uint8)))
      logits.append(out_logits[:batch_size - pad])
      feats.append(out_feats[:batch_size - pad])
    return np.concatenate(logits), np.concatenate(feats)

  def real_features(self, split: str | None = None, limit: int | None = None) -> np.ndarray:
    """Features of the real held-out images the judge's own evaluation uses."""
    from ascan_jax.data import pipeline
    cfg = self.task.config
    source = self.task.source(split or cfg.data.eval_split)
    codec = pipeline.ImageCodec.from_config(cfg)
    n = len(source) if limit is None else min(limit, len(source))
    images = np.stack([codec.eval(source.load(i))["image"] for i in range(n)])
    return self.predict(images, batch_size=min(250, n))[1]

  # ---- samples where they were drawn -----------------------------------------------------
  def start(self) -> JudgeStatistics:
    return JudgeStatistics(0, 0, generative_metrics.MomentAccumulator())

  def _step(self, mesh: Mesh):
    if mesh not in self._steps:
      embed = self._embed

      def chunk_statistics(variables, images, labels, count):
        logits, feats = embed(variables, images)
        valid = jnp.arange(images.shape[0]) < count
        correct = jnp.sum(valid & (jnp.argmax(logits, axis=-1) == labels), dtype=jnp.int32)
        mean, m2 = generative_metrics.masked_moments(feats, count)
        return correct, mean, m2

      self._steps[mesh] = jax.jit(chunk_statistics, out_shardings=NamedSharding(mesh, P()))
    return self._steps[mesh]

  def add(self, stats: JudgeStatistics, images: jax.Array, labels: jax.Array,
          count: int) -> None:
    """Folds one chunk into ``stats``: uint8 ``images`` [B, H, W, C] and int ``labels`` [B],
    global arrays split over one mesh, of which the first ``count`` rows are samples."""
    if not isinstance(images, jax.Array) or not isinstance(images.sharding, NamedSharding):
      raise TypeError("Judge.add takes a jax.Array with a NamedSharding (the generator's "
                      f"output), got {type(images).__name__}")
    self._check_images(images.shape)
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for "
                       f"{images.shape[0]} images")
    if not 0 < count <= images.shape[0]:
      raise ValueError(f"count={count} must be in [1, {images.shape[0]}] (rows of the chunk)")
    mesh = images.sharding.mesh
    if mesh not in self._replicated:
      self._replicated[mesh] = generate.replicate(self._variables, mesh)
    correct, mean, m2 = jax.device_get(
        self._step(mesh)(self._replicated[mesh], images, labels, np.int32(count)))
    stats.correct += int(correct)
    stats.count += int(count)
    stats.features.add(count, mean, m2)

  def finish(self, stats: JudgeStatistics, real_statistics) -> dict:
    """``real_statistics``: (mean, covariance) of the real images' features."""
    if stats.count == 0:
      raise ValueError("no samples were judged")
    fd = generative_metrics.frechet_distance(*stats.features.statistics(), *real_statistics)
    return {"sample_class_accuracy": stats.correct / stats.count, "fd_classifier": float(fd)}

  def evaluate(self, images: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
               batch_size: int = 256) -> dict:
    """The metrics of numpy images held by this process, on its local devices."""
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    rows = len(devices) * math.ceil(min(batch_size, max(1, len(images))) / len(devices))
    stats = self.start()
    for lo in range(0, len(images), rows):
      chunk, chunk_labels = images[lo:lo + rows], labels[lo:lo + rows]
      n = len(chunk)
      if n < rows:  # one compiled shape for every chunk.
        chunk = np.concatenate([chunk, np.zeros((rows - n,) + chunk.shape[1:], chunk.dtype)])
        chunk_labels = np.concatenate([chunk_labels, np.zeros(rows - n, np.int32)])
      self.add(stats, jax.device_put(chunk, sharding), jax.device_put(chunk_labels, sharding), n)
    return self.finish(stats, generative_metrics.feature_statistics(real_features))
