"""grain pipelines whose order depends only on the seed and the global step.

Training: with global batch ``G`` split over ``P`` processes (``L = G / P`` each), local example
``j`` of step ``s`` on process ``p`` is global position ``g = s*G + p*L + j``; epoch ``g // N``
reads record ``perm_epoch[g % N]``, where ``perm_epoch`` is a permutation seeded by
``(seed, epoch)``. So a global batch holds the same examples whatever ``P`` is, each process
reads only its own share, and resuming at step ``s`` (or on another topology) continues exactly.
Augmentation randomness is seeded by ``(seed, g)`` too.

Evaluation: position ``g = b*E + p*E_l + j`` of batch ``b``; positions past the end are padding
with ``mask = 0``, so every example counts exactly once over all processes.

Batches are dicts of numpy arrays: ``image`` uint8, ``label`` int32, ``mask`` float32 (0 for
padding and undecodable records) and ``index`` int64 (the global position, checked on resume).
Worker processes (``data.worker_count``) decode and augment in parallel; the iterator's state is
grain's and goes into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np
from absl import logging

from ascan_jax.data import sources as sources_lib
from ascan_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which part of every global batch this process reads."""
  process_index: int
  process_count: int

  def local(self, global_batch: int) -> int:
    if global_batch % self.process_count:
      raise ValueError(f"batch {global_batch} does not divide over {self.process_count} "
                       "processes")
    return global_batch // self.process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def _invalid(size: int) -> dict:
  return {"image": np.zeros((size, size, 3), np.uint8), "label": 0, "mask": 0.0}


def load_example(source, index: int, size: int, transform) -> dict:
  """``source.load(index)`` transformed; a broken record becomes a masked placeholder."""
  try:
    ex = source.load(index)
    image = transform(ex["image"])
  except sources_lib.RecordError as e:
    logging.warning("skipping record %d of %s: %s", index, getattr(source, "description", ""), e)
    return _invalid(size)
  return {"image": image, "label": ex["label"], "mask": 1.0}


class _TrainExample:
  """Picklable map: local position -> augmented example (runs in grain workers)."""

  def __init__(self, source, config, sharding: Sharding):
    self.source = source
    self.seed = int(config.seed)
    self.size = int(config.data.image_size)
    self.aug = config.augment
    self.global_batch = int(config.batch_size)
    self.local_batch = sharding.local(self.global_batch)
    self.offset = sharding.process_index * self.local_batch

  def global_position(self, i: int) -> int:
    step, j = divmod(int(i), self.local_batch)
    return step * self.global_batch + self.offset + j

  def __call__(self, i: int) -> dict:
    g = self.global_position(i)
    n = len(self.source)
    record = int(_epoch_permutation(self.seed, g // n, n)[g % n])
    rng = np.random.default_rng([self.seed, g])
    ex = load_example(self.source, record, self.size,
                      lambda im: transforms.train_transform(im, rng, self.size, self.aug))
    ex["index"] = g
    return ex


class _EvalExample:
  def __init__(self, source, config, sharding: Sharding):
    self.source = source
    self.size = int(config.data.image_size)
    self.fraction = float(config.data.eval_crop_fraction)
    self.global_batch = int(config.eval_batch_size)
    self.local_batch = sharding.local(self.global_batch)
    self.offset = sharding.process_index * self.local_batch

  def __call__(self, i: int) -> dict:
    b, j = divmod(int(i), self.local_batch)
    g = b * self.global_batch + self.offset + j
    if g >= len(self.source):
      ex = _invalid(self.size)
    else:
      ex = load_example(self.source, g, self.size, self._transform)
    ex["index"] = g
    return ex

  def _transform(self, image):
    if image.shape[0] == image.shape[1] and image.shape[0] <= self.size:
      return transforms.resize(image, self.size)  # small square images (digits): just resize.
    return transforms.eval_crop(image, self.size, self.fraction)


def _collate(examples) -> dict:
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.asarray([e["label"] for e in examples], np.int32),
          "mask": np.asarray([e["mask"] for e in examples], np.float32),
          "index": np.asarray([e["index"] for e in examples], np.int64)}


def _to_iter(ds: grain.MapDataset, local_batch: int, workers: int, buffer: int):
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=1))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer))
  return it


def train_dataset(source, config, sharding: Sharding, total_steps: int, start_step: int = 0):
  """An iterable of host-local training batches for steps ``start_step .. total_steps - 1``."""
  fn = _TrainExample(source, config, sharding)
  local = fn.local_batch
  ds = grain.MapDataset.range(start_step * local, total_steps * local).map(fn)
  return _to_iter(ds, local, config.data.worker_count, config.data.worker_buffer_size)


def num_eval_batches(num_examples: int, eval_batch_size: int) -> int:
  return math.ceil(num_examples / eval_batch_size)


def eval_dataset(source, config, sharding: Sharding):
  """An iterable of host-local evaluation batches covering every record exactly once."""
  fn = _EvalExample(source, config, sharding)
  batches = num_eval_batches(len(source), config.eval_batch_size)
  ds = grain.MapDataset.range(batches * fn.local_batch).map(fn)
  return _to_iter(ds, fn.local_batch, config.data.worker_count, config.data.worker_buffer_size)
