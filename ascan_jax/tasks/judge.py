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

import json

import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax import fileio
from ascan_jax import tasks
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


class Judge:
  """Predicts (logits, pooled features) of uint8 NHWC images with a trained classifier."""

  def __init__(self, task, variables, step: int, workdir: str):
    self.task = task
    self.step = step
    self.workdir = workdir
    self.image_size = task.config.data.image_size
    self.num_classes = task.config.data.num_classes
    model = task.model

    def predict(images):
      logits, emb = model.apply(variables, classification.normalize(images), train=False,
                                return_embedding=True)
      return logits.astype(jnp.float32), emb.astype(jnp.float32)

    self._predict = jax.jit(predict)

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
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"the judge expects [N, {self.image_size}, {self.image_size}, C] images, "
                       f"got {images.shape}")
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:  # one compiled shape for every batch.
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out_logits, out_feats = jax.device_get(self._predict(jnp.asarray(chunk, jnp.uint8)))
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
    return self.predict(images)[1]

  def evaluate(self, images: np.ndarray, labels: np.ndarray, real_features: np.ndarray) -> dict:
    logits, feats = self.predict(images)
    accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
    fd = generative_metrics.frechet_distance(
        *generative_metrics.feature_statistics(feats),
        *generative_metrics.feature_statistics(real_features))
    return {"sample_class_accuracy": accuracy, "fd_classifier": float(fd)}
