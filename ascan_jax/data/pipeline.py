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
host-only: the task lists them in ``Task.host_fields``). A resumed run rebuilds the stream at its
restored step (no iterator state is needed).

Loading (``Loading``, from ``config.data``): ``worker_count`` grain worker processes (capped at
the CPUs this process may use) decode and augment in parallel, ``worker_threads`` threads each;
with ``batching=worker`` (the default) every worker builds whole batches and hands each to the
training process as one shared-memory array, with ``batching=consumer`` workers send single
examples and a thread of the training process stacks them. Every combination gives the same
batches. Measured on a 2-core CPU (README, "Input pipeline throughput";
``python -m ascan_jax.tools.bench_data``), no mode costs measurably less CPU per image; worker
batching is the default because consumer batching puts per-example transfers and the stacking
(about 0.3 ms per 224² image) on the training process, where at several thousand images per
second it would compete with the training loop for the GIL. Evaluation starts its workers anew
for every pass: about 2 CPU-seconds per worker (interpreter and imports), about 2 s of wall time
per ImageNet evaluation with 64 workers (a minute over a 300-epoch run), so no pool of idle
processes is kept alive through training.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os

import grain
import numpy as np
from absl import logging

from ascan_jax import config_validation as cv
from ascan_jax.data import order as order_lib
from ascan_jax.data import pp
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


def image_train_ops(size: int, aug, draft: bool = True) -> list:
  """The classification training augmentation of ``config.augment`` as ops on ``image``
  (mixup/cutmix run later, on device). RandAugment's magnitude is clamped and colour jitter is
  dropped when RandAugment is on, as timm does with the same arguments (``data.transforms``)."""
  if aug is None:
    return [pp.Resize(size)]
  ops = [pp.RandomResizedCrop(size, scale=(aug.crop_min_scale, 1.0), draft=draft)
         if aug.random_resized_crop else pp.Resize(size)]
  if aug.flip:
    ops.append(pp.Flip())
  if aug.randaugment_layers > 0:
    ops.append(pp.RandAugment(aug.randaugment_layers, aug.randaugment_magnitude,
                              magnitude_max=transforms.randaugment_magnitude_max(aug)))
  if transforms.color_jitter_applies(aug):
    ops.append(pp.ColorJitter(aug.color_jitter))
  elif aug.color_jitter > 0:
    logging.log_first_n(logging.INFO, "augment.color_jitter=%s is not applied: RandAugment is "
                        "on, and timm drops colour jitter then (set "
                        "augment.color_jitter_with_randaugment=True to apply both)", 1,
                        aug.color_jitter)
  return ops


class ImageCodec(pp.Preprocess):
  """Records ``{'image', 'label'}`` -> uint8 images of ``data.image_size`` and int32 labels.

  Training applies ``config.augment`` (crop, flip, RandAugment, jitter); evaluation a centre crop
  of ``crop_fraction`` (or, with ``resize_small_squares``, a plain resize of square images no
  larger than the size, such as digits: ``data.eval_resize_small_squares``). Sources that keep
  encoded images hand them over undecoded, so the random resized crop decodes JPEGs at reduced
  size when its box allows (``draft``; ``data.decode_draft``).
  """

  def __init__(self, size: int, augment=None, crop_fraction: float = 0.875, *,
               resize_small_squares: bool | None = None, draft: bool = True):
    if resize_small_squares is None:  # callers written before the option keep their behaviour.
      resize_small_squares = True
    self.size = int(size)
    keep = [pp.Cast({"image": np.uint8, "label": np.int32}), pp.Select(("image", "label"))]
    super().__init__(
        image_train_ops(self.size, augment, draft) + keep,
        [pp.EvalCrop(self.size, crop_fraction, resize_small_squares=resize_small_squares)]
        + keep,
        {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": np.int32(0)},
        accepts_encoded=True)

  @classmethod
  def from_config(cls, config, augment: bool = True) -> "ImageCodec":
    d = config.data
    return cls(d.image_size, config.augment if augment else None, d.eval_crop_fraction,
               resize_small_squares=eval_resize_small_squares(d),
               draft=bool(d.get("decode_draft", DATA_KEYS["decode_draft"])))


# The keys of ``config.data`` and ``config.augment`` this module reads beyond the original
# schema, with their schema defaults; ``add_config_keys`` puts them into a task's schema.
DATA_KEYS = {
    "decode_draft": True,  # reduced-size JPEG decoding before the random resized crop.
    "eval_resize_small_squares": False,  # resize (not crop) small squares at evaluation.
    "worker_threads": 1,  # threads per worker process (or in the main process without workers).
    "batching": "worker",  # worker | consumer (Loading).
}
AUGMENT_KEYS = {
    "randaugment_magnitude_max": transforms.RAND_AUGMENT_MAGNITUDE_MAX,  # timm's bound; <= 0: none
    "color_jitter_with_randaugment": False,  # timm's force_color_jitter.
}


def add_config_keys(config) -> None:
  """Adds the keys above (at their defaults) to a task's schema (``default_config``) that has
  ``data`` and, for augmentation, ``augment`` sections; keys already there are kept."""
  for section, keys in (("data", DATA_KEYS), ("augment", AUGMENT_KEYS)):
    if section in config:
      for k, v in keys.items():
        if k not in config[section]:
          config[section][k] = v


def eval_resize_small_squares(data_config) -> bool:
  """``data.eval_resize_small_squares``. A config whose schema predates the key keeps the
  behaviour it was written with (on), so nothing changes until the schema declares it."""
  return bool(data_config.get("eval_resize_small_squares", True))


def load_example(source, index: int, codec, encode, bucket: int | None = None) -> dict:
  """``encode(record)`` with ``mask`` 1, where the record is ``source.load_encoded(index)`` for a
  codec that ``accepts_encoded`` (and a source that has it), else ``source.load(index)``; a
  broken record becomes the placeholder. With a bucket plan the record carries the step's
  ``bucket`` (``buckets.BucketResizeCrop`` crops to it) and the placeholder has its shape
  (``codec.placeholder(bucket)``)."""
  try:
    record = sources_lib.load_record(source, index, getattr(codec, "accepts_encoded", False))
    if bucket is not None:
      record = {**record, "bucket": bucket}
    ex = dict(encode(record))
  except sources_lib.RecordError as e:
    logging.warning("skipping record %d of %s: %s", index, getattr(source, "description", ""), e)
    placeholder = codec.placeholder() if bucket is None else codec.placeholder(bucket)
    return {**placeholder, "mask": 0.0}
  ex["mask"] = 1.0
  return ex


class _TrainExample:
  """Picklable map: local position -> encoded training example (runs in grain workers).

  With a ``plan`` (``data.buckets.BucketPlan``) position ``g`` reads ``plan.record_at(g)`` and
  every example of step ``s`` is encoded for ``plan.bucket_at(s)``, so each global batch has one
  shape; without one it reads ``order.record_at(g, N, seed)``."""

  def __init__(self, source, codec, config, sharding: Sharding, plan=None):
    self.source = source
    self.codec = codec
    self.plan = plan
    if plan is not None and (plan.num_records != len(source)
                             or plan.global_batch != int(config.batch_size)):
      raise ValueError(f"the bucket plan covers {plan.num_records} records in batches of "
                       f"{plan.global_batch}; {getattr(source, 'description', 'the source')} has "
                       f"{len(source)} and config.batch_size is {config.batch_size}")
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
    if self.plan is None:
      record, bucket = order_lib.record_at(g, len(self.source), self.seed, self.shuffle), None
    else:
      record, bucket = self.plan.record_at(g), self.plan.bucket_at(g // self.global_batch)
    rng = np.random.default_rng([self.seed, g])
    ex = load_example(self.source, record, self.codec, lambda e: self.codec.train(e, rng),
                      bucket)
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


BATCHING = ("worker", "consumer")


@dataclasses.dataclass(frozen=True)
class Loading:
  """How examples are computed and batched on this host (see ``loading_of``).

  * ``workers``: grain worker processes (0: the main process).
  * ``threads``: threads per process computing examples in parallel (PIL and numpy release the
    GIL for decoding and resampling, so threads add throughput on their own).
  * ``batching``: ``worker`` (each worker builds whole batches) or ``consumer`` (workers send
    single examples through shared memory, the main process batches them in a background
    thread).
  * ``buffer``: batches buffered per worker (``worker``) or in the consumer (``consumer``).
  """
  workers: int = 0
  threads: int = 1
  batching: str = "worker"
  buffer: int = 2


def usable_cpus() -> int:
  """CPUs this process may run on (its affinity mask, else the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def loading_of(config) -> Loading:
  """The config's ``Loading``; more workers than usable CPUs add memory, not speed, so the
  count is capped there (the data do not depend on it)."""
  d = config.data
  batching = str(d.get("batching", DATA_KEYS["batching"]))
  threads = int(d.get("worker_threads", DATA_KEYS["worker_threads"]))
  if batching not in BATCHING:
    raise cv.ConfigError(f"config.data.batching={batching!r} is not one of {BATCHING}")
  if threads < 1:
    raise cv.ConfigError(f"config.data.worker_threads={threads} must be at least 1")
  workers = int(d.worker_count)
  if workers > usable_cpus():
    logging.log_first_n(logging.INFO, "data.worker_count=%d but this process may use %d CPUs: "
                        "starting %d workers", 1, workers, usable_cpus(), usable_cpus())
    workers = usable_cpus()
  return Loading(workers=workers, threads=threads, batching=batching,
                 buffer=int(d.worker_buffer_size))


class _ExampleBatch:
  """Picklable map: a list of positions -> their collated batch, the examples computed by
  ``threads`` threads (created lazily in whichever process runs it)."""

  def __init__(self, fn, threads: int):
    self.fn, self.threads = fn, int(threads)
    self._pool = None

  def __getstate__(self):
    return {"fn": self.fn, "threads": self.threads}

  def __setstate__(self, state):
    self.__init__(state["fn"], state["threads"])

  def __call__(self, positions) -> dict:
    if self.threads <= 1:
      return collate([self.fn(i) for i in positions])
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
    return collate(list(self._pool.map(self.fn, positions)))


def _batches(positions: grain.MapDataset, fn, local_batch: int, loading: Loading):
  """Host-local batches of ``fn(position)`` over ``positions``, computed as ``loading`` says.
  Either way a batch holds the same examples in the same order."""
  workers, threads = loading.workers, max(1, loading.threads)
  mp = lambda it, buffer: it.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=max(1, buffer)))
  if loading.batching == "consumer" and workers > 0:
    # Workers read every workers-th example (grain slices after the map); the consumer's
    # round-robin restores the order, and batches are built in a background thread.
    read = grain.ReadOptions(num_threads=threads if threads > 1 else 0,
                             prefetch_buffer_size=local_batch if threads > 1 else 1)
    it = mp(positions.map(fn).to_iter_dataset(read),
            -(-loading.buffer * local_batch // workers))
    it = it.batch(local_batch, drop_remainder=True, batch_fn=collate)
    return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=loading.buffer)
  ds = positions.batch(local_batch, drop_remainder=True, batch_fn=list)
  ds = ds.map(_ExampleBatch(fn, threads))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 1,
                                            prefetch_buffer_size=1))
  return mp(it, loading.buffer) if workers > 0 else it


def train_dataset(source, codec, config, sharding: Sharding, total_steps: int,
                  start_step: int = 0, plan=None):
  """An iterable of host-local training batches for steps ``start_step .. total_steps - 1``;
  ``plan``: a ``data.buckets.BucketPlan`` (one aspect-ratio bucket per global batch)."""
  fn = _TrainExample(source, codec, config, sharding, plan)
  local = fn.local_batch
  positions = grain.MapDataset.range(start_step * local, total_steps * local)
  return _batches(positions, fn, local, loading_of(config))


def num_eval_batches(num_examples: int, eval_batch_size: int) -> int:
  return math.ceil(num_examples / eval_batch_size)


def eval_dataset(source, codec, config, sharding: Sharding):
  """An iterable of host-local evaluation batches covering every record exactly once."""
  fn = _EvalExample(source, codec, config, sharding)
  batches = num_eval_batches(len(source), config.eval_batch_size)
  positions = grain.MapDataset.range(batches * fn.local_batch)
  return _batches(positions, fn, fn.local_batch, loading_of(config))
