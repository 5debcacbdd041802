"""Training batches from a ``buckets.BucketPlan``: one bucket (one shape) per global batch.

The same contract as ``data.pipeline.train_dataset``, so the loop needs no change to read it:
local example ``j`` of step ``s`` on process ``p`` is global position ``g = s G + p L + j``
(``index`` = ``g``, which the loop checks on resume), its augmentation generator is seeded by
``(seed, g)``, and broken records are masked (``mask`` 0) and counted. What changes is which
record ``g`` reads (``plan.record_at(g)`` instead of ``order.record_at``) and that the example
carries the step's bucket: the record gets a ``bucket`` field before the codec runs (so
``buckets.BucketResizeCrop`` crops to the plan's bucket, not to a recomputed one), and a broken
record becomes ``codec.placeholder(bucket)`` of that bucket's shape. A bucketed codec therefore
has ``train(example, rng)``, ``eval(example)`` and ``placeholder(bucket=None)``.

This module is the reference implementation of the interface proposed for ``data.pipeline``
(a ``plan`` argument to ``train_dataset``); until that lands, a task calls
``bucketed_train_dataset`` from its ``train_batches``.
"""
from __future__ import annotations

import grain
import numpy as np
from absl import logging

from ascan_jax.data import buckets as buckets_lib
from ascan_jax.data import pipeline
from ascan_jax.data import sources as sources_lib


class BucketedTrainExample:
  """Picklable map: local position -> encoded training example of the plan's bucket."""

  def __init__(self, source, codec, plan: buckets_lib.BucketPlan, seed: int,
               sharding: pipeline.Sharding):
    if len(source) != plan.num_records:
      raise ValueError(f"the plan covers {plan.num_records} records, {source.description} has "
                       f"{len(source)}")
    self.source, self.codec, self.plan = source, codec, plan
    self.seed = int(seed)
    self.global_batch = plan.global_batch
    self.local_batch = sharding.local(self.global_batch)
    self.offset = sharding.process_index * self.local_batch

  def __call__(self, i: int) -> dict:
    step, j = divmod(int(i), self.local_batch)
    g = step * self.global_batch + self.offset + j
    bucket = self.plan.bucket_at(step)
    record = self.plan.record_at(g)
    rng = np.random.default_rng([self.seed, g])
    try:
      example = dict(sources_lib.load_record(self.source, record,
                                             getattr(self.codec, "accepts_encoded", False)))
      example["bucket"] = bucket
      example = dict(self.codec.train(example, rng))
      example["mask"] = 1.0
    except sources_lib.RecordError as e:
      logging.warning("skipping record %d of %s: %s", record,
                      getattr(self.source, "description", ""), e)
      example = {**self.codec.placeholder(bucket), "mask": 0.0}
    example["index"] = g
    return example


def bucketed_train_dataset(source, codec, plan: buckets_lib.BucketPlan, config,
                           sharding: pipeline.Sharding, total_steps: int, start_step: int = 0):
  """Host-local training batches for steps ``start_step .. total_steps - 1`` (module docstring);
  ``config.seed``, ``config.data.worker_count`` and ``worker_buffer_size`` as in the pipeline."""
  if plan.global_batch != int(config.batch_size):
    raise ValueError(f"the plan is for global batch {plan.global_batch}, config.batch_size is "
                     f"{config.batch_size}")
  fn = BucketedTrainExample(source, codec, plan, config.seed, sharding)
  local = fn.local_batch
  ds = grain.MapDataset.range(start_step * local, total_steps * local).map(fn)
  ds = ds.batch(local, drop_remainder=True, batch_fn=pipeline.collate)
  workers = int(config.data.worker_count)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 1,
                                            prefetch_buffer_size=1))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
  return it
