"""Aspect-ratio buckets and the bucketed batch plan: one bucket per batch, pure in (seed, step)."""
import math
import pickle

import ml_collections
import numpy as np
import pytest

from ascan_jax.data import bucketed_pipeline, buckets, caption_pp, pipeline, sources

SIZES = ((40, 40), (30, 60), (60, 30), (36, 44), (20, 100))  # the last: an extreme aspect.
TABLE = buckets.bucket_table(64, 8)


class SizedSource:
  """Records of known sizes whose first channel names them (record % 251). Record 13 does not
  decode (its header does: it gets a bucket and is masked in training); record 17 has no
  readable header (no bucket). A plain data fixture: the plan and the pipeline are tested."""

  def __init__(self, n: int, broken: int = 13):
    self.n, self.broken = n, broken
    self.description = f"sized test records ({n})"

  def __len__(self):
    return self.n

  def image_size(self, i):
    if i == 17:
      raise sources.RecordError("record 17 has no header")
    return SIZES[(i * 7) % len(SIZES)]

  def load(self, i):
    if i in (self.broken, 17):
      raise sources.RecordError(f"record {i} is broken")
    h, w = self.image_size(i)
    image = np.full((h, w, 3), i % 251, np.uint8)  # channel 0 names the record ...
    image[..., 1] = np.add.outer(np.arange(h), 2 * np.arange(w)) % 256  # ... 1 shows the crop.
    return {"image": image, "caption": f"record {i}",
            "captions": (f"record {i}",)}


def test_sdxl_table_and_scaling():
  assert buckets.bucket_table(1024, 64) == buckets.SDXL_BUCKETS_1024
  for side, multiple in ((512, 64), (256, 32), (64, 8)):
    table = buckets.bucket_table(side, multiple)
    assert len(set(table)) == len(table) and table[0] == (side, side)
    for h, w in table:
      assert h % multiple == 0 and w % multiple == 0
      assert abs(math.log(h * w / side**2)) < 0.2  # about the target area.
  assert buckets.parse_table("64x64, 48x80") == ((64, 64), (48, 80))


def test_nearest_bucket_and_crop():
  table = buckets.SDXL_BUCKETS_1024
  assert table[buckets.nearest_bucket(1000, 1000, table)] == (1024, 1024)
  assert table[buckets.nearest_bucket(480, 640, table)] == (896, 1152)  # 3:4 -> 0.78
  assert table[buckets.nearest_bucket(1080, 1920, table)] == (768, 1344)  # 16:9
  assert table[buckets.nearest_bucket(100, 1000, table)] == (640, 1536)  # beyond the last
  image = np.arange(60 * 40, dtype=np.int64).reshape(60, 40)[..., None].repeat(3, -1) % 256
  image = image.astype(np.uint8)
  assert buckets.crop_box(60, 40, (32, 32)) == (10, 0, 40, 40)
  out = buckets.crop_to_bucket(image, (32, 32))
  assert out.shape == (32, 32, 3)
  rng = np.random.default_rng(0)
  boxes = {buckets.crop_box(60, 40, (32, 32), rng) for _ in range(50)}
  assert {b[0] for b in boxes} > {0, 20} and all(b[1:] == (0, 40, 40) for b in boxes)
  op = buckets.BucketResizeCrop(TABLE)
  nearest = op({"image": image}, None)
  assert nearest["image"].shape[:2] == TABLE[nearest["bucket"]]
  forced = op({"image": image, "bucket": 0}, None)
  assert forced["bucket"] == 0 and forced["image"].shape[:2] == TABLE[0]


def test_every_batch_is_one_bucket_and_an_epoch_covers_each_bucket():
  source = SizedSource(300)
  ids = buckets.compute_bucket_ids(source, TABLE)
  assert ids[17] == buckets.NO_BUCKET and ids[13] != buckets.NO_BUCKET
  plan = buckets.BucketPlan(ids, 8, seed=5, num_buckets=len(TABLE))
  summary = plan.summary()
  assert summary["steps_per_epoch"] == sum(int(c) // 8 for c in plan.counts)
  seen = []
  for step in range(plan.steps_per_epoch):
    records = plan.step_records(step)
    assert set(ids[records].tolist()) == {plan.bucket_at(step)}
    seen += records.tolist()
  assert len(seen) == len(set(seen)) and 17 not in seen  # at most once per epoch ...
  per_bucket = np.bincount(ids[seen], minlength=len(TABLE))
  np.testing.assert_array_equal(per_bucket, plan.batches * 8)  # ... and each bucket fully.
  # The next epoch is another permutation of the batches and, within a bucket, of the records.
  r = plan.steps_per_epoch
  assert [plan.bucket_at(r + s) for s in range(r)] != [plan.bucket_at(s) for s in range(r)]
  first = {plan.batch_at(s)[1:]: set(plan.step_records(s).tolist()) for s in range(r)}
  second = {plan.batch_at(r + s)[1:]: set(plan.step_records(r + s).tolist()) for s in range(r)}
  assert first.keys() == second.keys() and all(first[k] != second[k] for k in first)


def test_plan_is_a_pure_function_with_bounded_memory(tmp_path):
  source = SizedSource(300)
  ids = buckets.compute_bucket_ids(source, TABLE)
  a = buckets.BucketPlan(ids, 8, seed=1, num_buckets=len(TABLE), order_path=str(tmp_path / "o.npy"))
  b = buckets.BucketPlan(ids.copy(), 8, seed=1, num_buckets=len(TABLE))
  c = pickle.loads(pickle.dumps(a))
  far = 10**12
  for step in (0, 1, 17, 1000, far):
    assert a.batch_at(step) == b.batch_at(step) == c.batch_at(step)
    np.testing.assert_array_equal(a.step_records(step), c.step_records(step))
  assert buckets.BucketPlan(ids, 8, seed=2).step_records(0).tolist() != a.step_records(0).tolist()
  # Memory: the grouped order (mapped from its file) plus O(buckets); nothing per step.
  arrays = [v for v in vars(b).values() if isinstance(v, np.ndarray)]
  assert sum(x.nbytes for x in arrays) <= 4 * len(ids) + 64 * len(TABLE)
  assert len(pickle.dumps(a)) < 2000 and isinstance(c._order, np.memmap)
  with pytest.raises(ValueError, match="no bucket holds a full global batch"):
    buckets.BucketPlan(ids, 10_000, seed=0)


def _batches(source, plan, steps, process_count, start=0, workers=0):
  config = ml_collections.ConfigDict({"seed": 7, "batch_size": plan.global_batch, "data": {
      "worker_count": workers, "worker_buffer_size": 1}})
  codec = caption_pp.CaptionImageCodec(table=TABLE)
  streams = [iter(bucketed_pipeline.bucketed_train_dataset(
      source, codec, plan, config, pipeline.Sharding(p, process_count), steps, start))
      for p in range(process_count)]
  out = []
  for _ in range(start, steps):
    parts = [next(s) for s in streams]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def test_same_batches_on_one_and_two_processes_and_after_resume(tmp_path):
  source = SizedSource(200)
  ids = buckets.compute_bucket_ids(source, TABLE, str(tmp_path / "ids.npy"))
  plan = buckets.BucketPlan(ids, 8, seed=7, num_buckets=len(TABLE),
                            order_path=str(tmp_path / "order.npy"))
  source.broken = int(plan.step_records(6)[3])  # a record of step 6 does not decode.
  steps = 12
  one = _batches(source, plan, steps, 1)
  two = _batches(source, plan, steps, 2)
  resumed = _batches(source, plan, steps, 2, start=5, workers=1)
  skipped = 0
  for step, batch in enumerate(one):
    b = plan.bucket_at(step)
    assert batch["image"].shape == (8,) + TABLE[b] + (3,)  # one shape per batch.
    records = plan.step_records(step)
    np.testing.assert_array_equal(batch["index"], step * 8 + np.arange(8))
    readable = records != source.broken
    np.testing.assert_array_equal(batch["mask"], readable.astype(np.float32))
    np.testing.assert_array_equal(batch["image"][readable, 0, 0, 0], records[readable] % 251)
    skipped += int((~readable).sum())
    for other in (two[step],) + ((resumed[step - 5],) if step >= 5 else ()):
      assert sorted(other) == sorted(batch)
      for k in batch:
        np.testing.assert_array_equal(other[k], batch[k])
  assert skipped == 1  # the broken record was drawn, masked and counted.


def test_bucket_ids_are_cached_next_to_the_data(tmp_path):
  source = SizedSource(50)
  calls = []
  size = source.image_size
  source.image_size = lambda i: calls.append(i) or size(i)
  path = str(tmp_path / "ids.npy")
  first = buckets.compute_bucket_ids(source, TABLE, path)
  assert len(calls) == 50
  np.testing.assert_array_equal(buckets.compute_bucket_ids(source, TABLE, path), first)
  assert len(calls) == 50  # read back, not recomputed ...
  buckets.compute_bucket_ids(source, TABLE[:3], path)
  assert len(calls) == 100  # ... unless the table changed.
