"""grain pipelines whose order depends only on the seed and the global step.

Training: with global batch ``G`` split over ``P`` processes (``L = G / P`` each), local example
``j`` of step ``s`` on process ``p`` is global position ``g = s*G + p*L + j``; epoch ``g // N``
reads record ``perm_epoch[g % N]``, where ``perm_epoch`` is a permutation seeded by
``(seed, epoch)``. So a global batch holds the same examples whatever ``P`` is, each process
reads only its own share, and resuming at step ``s`` (or on another topology) continues exactly.
Augmentation randomness is seeded by ``(seed, g)`` too.

Evaluation: position ``g = b*E + p*E_l + j`` of batch ``b``; positions past the end are padding
with ``mask = 0``, so every example counts exactly once over all processes.

What an example becomes is the task's choice: a *codec* (``ImageCodec`` here for images; the
diffusion task has one for cached latents) turns a source record into arrays, for training (with
a random generator) and for evaluation, and provides the placeholder used for padding and for
undecodable records. The pipeline adds ``mask`` (float32, 0 for padding and broken records) and
``index`` (int64, the global position, checked on resume) and stacks every field into batches.
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


class ImageCodec:
  """Records ``{'image', 'label'}`` -> uint8 images of ``data.image_size`` and int labels.

  Training applies ``config.augment`` (crop, flip, RandAugment, jitter); evaluation a centre crop
  (or a plain resize for small square images such as digits).
  """

  def __init__(self, size: int, augment=None, crop_fraction: float = 0.875):
    self.size = int(size)
    self.aug = augment
    self.fraction = float(crop_fraction)

  @classmethod
  def from_config(cls, config, augment: bool = True) -> "ImageCodec":
    return cls(config.data.image_size, config.augment if augment else None,
               config.data.eval_crop_fraction)

  def placeholder(self) -> dict:
    return {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": 0}

  def train(self, example: dict, rng: np.random.Generator) -> dict:
    if self.aug is None:
      image = transforms.resize(example["image"], self.size)
    else:
      image = transforms.train_transform(example["image"], rng, self.size, self.aug)
    return {"image": image, "label": example["label"]}

  def eval(self, example: dict) -> dict:
    image = example["image"]
    if image.shape[0] == image.shape[1] and image.shape[0] <= self.size:
      image = transforms.resize(image, self.size)  # small square images (digits): just resize.
    else:
      image = transforms.eval_crop(image, self.size, self.fraction)
    return {"image": image, "label": example["label"]}


def load_example(source, index: int, codec, encode) -> dict:
  """``encode(source.load(index))`` with ``mask`` 1; a broken record becomes the placeholder."""
  try:
    ex = dict(encode(source.load(index)))
  except sources_lib.RecordError as e:
    logging.warning("skipping record %d of %s: %s", index, getattr(source, "description", ""), e)
    return {**codec.placeholder(), "mask": 0.0}
  ex["mask"] = 1.0
  return ex


class _TrainExample:
  """Picklable map: local position -> encoded training example (runs in grain workers)."""

  def __init__(self, source, codec, config, sharding: Sharding):
    self.source = source
    self.codec = codec
    self.seed = int(config.seed)
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
    ex = load_example(self.source, record, self.codec, lambda e: self.codec.train(e, rng))
    ex["index"] = g
    return ex


class _EvalExample:
  def __init__(self, source, codec, config, sharding: Sharding):
    self.source = source
    self.codec = codec
    self.global_batch = int(config.eval_batch_size)
    self.local_batch = sharding.local(self.global_batch)
    self.offset = sharding.process_index * self.local_batch

  def __call__(self, i: int) -> dict:
    b, j = divmod(int(i), self.local_batch)
    g = b * self.global_batch + self.offset + j
    if g >= len(self.source):
      ex = {**self.codec.placeholder(), "mask": 0.0}
    else:
      ex = load_example(self.source, g, self.codec, self.codec.eval)
    ex["index"] = g
    return ex


_DTYPES = {"label": np.int32, "mask": np.float32, "index": np.int64}


def _collate(examples) -> dict:
  return {k: np.stack([np.asarray(e[k], _DTYPES.get(k)) for e in examples])
          for k in examples[0]}


def _to_iter(ds: grain.MapDataset, local_batch: int, workers: int, buffer: int):
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
  read = grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=1)
  it = ds.to_iter_dataset(read)
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer))
  return it


def train_dataset(source, codec, config, sharding: Sharding, total_steps: int,
                  start_step: int = 0):
  """An iterable of host-local training batches for steps ``start_step .. total_steps - 1``."""
  fn = _TrainExample(source, codec, config, sharding)
  local = fn.local_batch
  ds = grain.MapDataset.range(start_step * local, total_steps * local).map(fn)
  return _to_iter(ds, local, config.data.worker_count, config.data.worker_buffer_size)


def num_eval_batches(num_examples: int, eval_batch_size: int) -> int:
  return math.ceil(num_examples / eval_batch_size)


def eval_dataset(source, codec, config, sharding: Sharding):
  """An iterable of host-local evaluation batches covering every record exactly once."""
  fn = _EvalExample(source, codec, config, sharding)
  batches = num_eval_batches(len(source), config.eval_batch_size)
  ds = grain.MapDataset.range(batches * fn.local_batch).map(fn)
  return _to_iter(ds, fn.local_batch, config.data.worker_count, config.data.worker_buffer_size)
