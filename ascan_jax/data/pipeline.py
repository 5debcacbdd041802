"""grain pipelines whose order depends only on the seed and the global step.

Training: with global batch ``G`` split over ``P`` processes (``L = G / P`` each), local example
``j`` of step ``s`` on process ``p`` is global position ``g = s*G + p*L + j``, which reads the
record ``data.order.record_at(g, N, seed)`` (a permutation per epoch, random access, constant
memory). So a global batch holds the same examples whatever ``P`` is, each process reads only its
own share, and resuming at step ``s`` (or on another topology) continues exactly. Augmentation
randomness is seeded by ``(seed, g)`` too.

Evaluation: position ``g = b*E + p*E_l + j`` of batch ``b``; positions past the end are padding
with ``mask = 0``, so every example counts exactly once over all processes.

Records are dicts of named fields. What an example becomes is the task's choice: a *codec*
(``data.pp``; ``ImageCodec`` here for images, the diffusion task has one for cached latents) turns
a source record into fields, for training (with a random generator) and for evaluation, and
provides the placeholder used for padding and for undecodable records. The pipeline adds
``mask`` (float32, 0 for padding and broken records) and ``index`` (int64, the global position,
checked on resume) and stacks every field into batches: numpy arrays keep their dtype, Python
ints become int32, floats float32, and strings stay a numpy object array (such fields are
host-only: the task lists them in ``Task.host_fields``). Worker processes
(``data.worker_count``) decode and augment in parallel; the iterator's state is grain's and goes
into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from absl import logging

from ascan_jax.data import order as order_lib
from ascan_jax.data import pp
from ascan_jax.data import sources as sources_lib


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


def image_train_ops(size: int, aug) -> list:
  """The classification training augmentation of ``config.augment`` as ops on ``image``
  (mixup/cutmix run later, on device)."""
  if aug is None:
    return [pp.Resize(size)]
  ops = [pp.RandomResizedCrop(size, scale=(aug.crop_min_scale, 1.0))
         if aug.random_resized_crop else pp.Resize(size)]
  if aug.flip:
    ops.append(pp.Flip())
  if aug.randaugment_layers > 0:
    ops.append(pp.RandAugment(aug.randaugment_layers, aug.randaugment_magnitude))
  if aug.color_jitter > 0:
    ops.append(pp.ColorJitter(aug.color_jitter))
  return ops


class ImageCodec(pp.Preprocess):
  """Records ``{'image', 'label'}`` -> uint8 images of ``data.image_size`` and int32 labels.

  Training applies ``config.augment`` (crop, flip, RandAugment, jitter); evaluation a centre crop
  (or a plain resize for small square images such as digits).
  """

  def __init__(self, size: int, augment=None, crop_fraction: float = 0.875):
    self.size = int(size)
    keep = [pp.Cast({"image": np.uint8, "label": np.int32}), pp.Select(("image", "label"))]
    super().__init__(
        image_train_ops(self.size, augment) + keep,
        [pp.EvalCrop(self.size, crop_fraction)] + keep,
        {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": np.int32(0)})

  @classmethod
  def from_config(cls, config, augment: bool = True) -> "ImageCodec":
    return cls(config.data.image_size, config.augment if augment else None,
               config.data.eval_crop_fraction)


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
    self.shuffle = config.data.get("shuffle", "index_shuffle")

  def global_position(self, i: int) -> int:
    step, j = divmod(int(i), self.local_batch)
    return step * self.global_batch + self.offset + j

  def __call__(self, i: int) -> dict:
    g = self.global_position(i)
    record = order_lib.record_at(g, len(self.source), self.seed, self.shuffle)
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


_FIXED_DTYPES = {"mask": np.float32, "index": np.int64}


def _dtype_of(value):
  if isinstance(value, bool):
    return np.bool_
  if isinstance(value, int):
    return np.int32
  if isinstance(value, float):
    return np.float32
  return np.asarray(value).dtype


def _field(values: list, key: str) -> np.ndarray:
  first = values[0]
  if isinstance(first, (str, bytes)):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
  dtype = _FIXED_DTYPES.get(key) or _dtype_of(first)
  return np.stack([np.asarray(v, dtype) for v in values])


def collate(examples: list[dict]) -> dict:
  """Stacks a list of examples into a batch (see the module docstring for the dtypes)."""
  keys = list(examples[0])
  for e in examples[1:]:
    if list(e) != keys:
      raise ValueError(f"examples of one batch have different fields: {keys} vs {list(e)}")
  return {k: _field([e[k] for e in examples], k) for k in keys}


def _to_iter(ds: grain.MapDataset, local_batch: int, workers: int, buffer: int):
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=collate)
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
