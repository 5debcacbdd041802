"""Reduced-size JPEG decoding, batching modes and the pipeline benchmark tool (small settings)."""
import io

import numpy as np
import pytest
from PIL import Image

from ascan_jax.data import pipeline, pp, sources, transforms
from ascan_jax.tools import bench_data
from configs import ascan_t

SIZE = 32


def _jpeg(width, height, seed=0, fmt="JPEG"):
  return bench_data.synthetic_jpeg(width, height, np.random.default_rng(seed)) if fmt == "JPEG" \
      else _png(width, height, seed)


def _png(width, height, seed):
  buf = io.BytesIO()
  image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _config(**data):
  c = ascan_t.get_config()  # the ImageNet recipe (RandAugment, flip, crop), at a tiny size.
  c.data.image_size = SIZE
  c.data.num_classes = 10
  c.batch_size = c.eval_batch_size = 8
  for k, v in data.items():
    c.data[k] = v
  return c


def _take(iterable, n):
  it = iter(iterable)
  out = [next(it) for _ in range(n)]
  getattr(it, "close", lambda: None)()
  return out


def test_reduced_decode_size_and_formats():
  enc = sources.EncodedImage(_jpeg(300, 200))
  assert enc.shape == (200, 300, 3)
  for factor, expect in ((1, (200, 300)), (2, (100, 150)), (4, (50, 75)), (8, (25, 38))):
    image, applied = enc.decode_reduced(factor)
    assert applied == factor and image.shape == expect + (3,) and image.dtype == np.uint8
  np.testing.assert_array_equal(enc.decode(), sources.decode_image(enc.data))
  png = sources.EncodedImage(_png(64, 48, 0))
  image, applied = png.decode_reduced(4)  # no scaled decoding for PNG: full size.
  assert applied == 1 and image.shape == (48, 64, 3)
  with pytest.raises(sources.RecordError, match="header"):
    sources.EncodedImage(b"\xff\xd8 not a jpeg")


def test_draft_factor_keeps_the_crop_covering_the_output():
  assert transforms.draft_factor((0, 0, 256, 256), 32) == 8
  assert transforms.draft_factor((0, 0, 255, 256), 32) == 4  # 255 < 8 * 32.
  assert transforms.draft_factor((0, 0, 64, 300), 32) == 2
  assert transforms.draft_factor((0, 0, 63, 300), 32) == 1
  assert transforms.draft_factor((0, 0, 400, 400), (64, 32)) == 4


def test_draft_crop_is_deterministic_and_close_to_the_full_decode():
  """Same box (drawn from the header's size) and same later draws; pixels within resampling
  differences of the full decode."""
  enc = sources.EncodedImage(_jpeg(640, 480, seed=3))
  full = enc.decode()
  crop = pp.RandomResizedCrop(SIZE, scale=(0.3, 1.0))
  diffs = []
  for seed in range(6):
    rng_a, rng_b, rng_c = (np.random.default_rng([7, seed]) for _ in range(3))
    draft = crop({"image": enc}, rng_a)["image"]
    again = crop({"image": sources.EncodedImage(enc.data)}, rng_b)["image"]
    decoded = crop({"image": full}, rng_c)["image"]
    np.testing.assert_array_equal(draft, again)
    assert draft.shape == decoded.shape == (SIZE, SIZE, 3)
    assert rng_a.random() == rng_c.random()  # the draft path drew exactly what the array path did.
    diffs.append(np.abs(draft.astype(np.float32) - decoded).mean())
  h, w = full.shape[:2]
  boxes = [transforms.random_resized_crop_box(h, w, np.random.default_rng([7, s]), (0.3, 1.0))
           for s in range(6)]
  assert all(transforms.draft_factor(b, SIZE) >= 4 for b in boxes)  # the draft path ran.
  # Resampling differences only (about 1 here; a box one reduced pixel off gives 4 or more).
  assert max(diffs) < 3.0, diffs


def _encoded_source(n=24, sizes=((160, 120), (120, 160), (96, 96))):
  return bench_data.SyntheticJpegSource(n, sizes, num_classes=10, distinct=2)


def test_batching_modes_give_identical_batches():
  c = _config()
  src = _encoded_source()
  codec = pipeline.ImageCodec.from_config(c)
  one = pipeline.Sharding(0, 1)
  runs = {}
  for workers, threads, batching in ((0, 1, "worker"), (0, 2, "worker"), (2, 2, "worker"),
                                     (2, 2, "consumer")):
    c.data.worker_count = workers
    c.data["worker_threads"], c.data["batching"] = threads, batching
    runs[(workers, threads, batching)] = _take(pipeline.train_dataset(src, codec, c, one, 3), 3)
  reference = runs.pop((0, 1, "worker"))
  assert reference[0]["image"].shape == (8, SIZE, SIZE, 3)
  np.testing.assert_array_equal(reference[2]["index"], np.arange(16, 24))
  for name, batches in runs.items():
    for a, b in zip(reference, batches):
      assert sorted(a) == sorted(b), name
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")


def test_bench_tool_runs_with_tiny_settings(tmp_path):
  c = _config()
  result = bench_data.run(c, workers=[0], threads=[1], batching=["worker"], drafts=[False, True],
                          batches=1, batch_size=4, sizes=((96, 64),), recipe="before",
                          evaluate=True, measure_machine=False)
  assert [r["draft"] for r in result["pipeline"]] == [False, True]
  for row in result["pipeline"]:
    assert row["images_per_s"] > 0 and row["first_batch_s"] > 0 and row["eval_images_per_s"] > 0
  stages = result["stages"]
  assert stages["images"] > 0 and stages["decode_full_ms"] > 0 and stages["randaugment_ms"] > 0
  assert result["config"]["augment"]["color_jitter_with_randaugment"] is True  # recipe=before.
