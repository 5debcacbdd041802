"""Sources, transforms and grain pipelines: determinism, per-process shares, broken records."""
import io
import json
import os

import msgpack
import numpy as np
import pytest
from PIL import Image

from ascan_jax.data import pipeline, sources, transforms
from ascan_jax.tools import folder_to_array_record
from configs import ascan_t


def _config(**data):
  c = ascan_t.get_config("runlocal")
  c.batch_size = 8
  c.eval_batch_size = 6
  for k, v in data.items():
    c.data[k] = v
  return c


def _train(src, c, sharding, total_steps, start_step=0):
  codec = pipeline.ImageCodec.from_config(c)
  return pipeline.train_dataset(src, codec, c, sharding, total_steps, start_step)


def _take(iterable, n):
  it = iter(iterable)
  return [next(it) for _ in range(n)]


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _image_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=20):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      img = rng.integers(0, 255, (size + i, size, 3), dtype=np.uint8)
      Image.fromarray(img).save(root / c / f"{i}.png")
  return root


def test_embedded_mnist_split_is_disjoint_and_real():
  train = sources.EmbeddedSource("embedded_mnist", "train", 0.2)
  held = sources.EmbeddedSource("embedded_mnist", "validation", 0.2)
  assert len(train) == 4000 and len(held) == 1000
  ex = train.load(0)
  assert ex["image"].shape == (28, 28, 3) and ex["image"].dtype == np.uint8
  assert 0 <= ex["label"] < 10 and ex["image"].max() > 100  # a real digit, not blank.
  seen = {train.images[i].tobytes() for i in range(len(train))}
  assert sum(held.images[i].tobytes() in seen for i in range(len(held))) == 0
  assert set(np.unique(held.labels)) == set(range(10))


def test_train_stream_is_deterministic_and_resumes_at_a_step():
  c = _config()
  src = sources.get_source(c.data, "train")
  one = pipeline.Sharding(0, 1)
  full = _take(_train(src, c, one, 6), 6)
  again = _take(_train(src, c, one, 6), 6)
  resumed = _take(_train(src, c, one, 6, start_step=4), 2)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["index"], b["index"])
  np.testing.assert_array_equal(full[1]["index"], np.arange(8, 16))


def test_global_batch_does_not_depend_on_process_count():
  c = _config()
  src = sources.get_source(c.data, "train")
  single = _take(_train(src, c, pipeline.Sharding(0, 1), 3), 3)
  parts = [_take(_train(src, c, pipeline.Sharding(p, 2), 3), 3)
           for p in range(2)]
  for step in range(3):
    joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in single[step]}
    for k in single[step]:
      np.testing.assert_array_equal(single[step][k], joined[k])


def test_training_examples_read_the_record_the_order_names():
  from ascan_jax.data import order
  c = _config(name="embedded_digits", num_classes=10)
  c.augment.random_resized_crop = False
  src = sources.get_source(c.data, "train")
  n = len(src)
  fn = pipeline._TrainExample(src, pipeline.ImageCodec.from_config(c), c, pipeline.Sharding(0, 1))
  for g in (0, 7, n - 1, n, 2 * n + 5):
    ex = fn(g)
    assert ex["index"] == g
    assert ex["label"] == src.load(order.record_at(g, n, c.seed))["label"]


def test_eval_counts_every_example_once_across_processes():
  c = _config()
  src = sources.get_source(c.data, "validation")  # 1000 examples; eval batch 6 -> padding.
  seen = []
  total_mask = 0.0
  for p in range(2):
    codec = pipeline.ImageCodec.from_config(c)
    for batch in pipeline.eval_dataset(src, codec, c, pipeline.Sharding(p, 2)):
      assert batch["image"].shape == (3, 32, 32, 3)
      seen += [int(i) for i, m in zip(batch["index"], batch["mask"]) if m > 0]
      total_mask += float(batch["mask"].sum())
  assert sorted(seen) == list(range(len(src)))
  assert total_mask == len(src)


def test_worker_processes_give_the_same_batches():
  c = _config()
  src = sources.get_source(c.data, "train")
  c.data.worker_count = 0
  a = _take(_train(src, c, pipeline.Sharding(0, 1), 3), 3)
  c.data.worker_count = 2
  b = _take(_train(src, c, pipeline.Sharding(0, 1), 3), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_folder_tool_and_array_record_source(tmp_path):
  root = _image_folder(tmp_path / "images")
  meta = folder_to_array_record.convert(str(root), str(tmp_path / "ar"), eval_fraction=0.2,
                                        records_per_shard=4)
  assert meta["class_names"] == ["cat", "dog", "emu"]
  assert meta["splits"]["train"]["num_examples"] == 12
  assert meta["splits"]["validation"]["num_examples"] == 3
  c = _config(name="array_record", data_dir=str(tmp_path / "ar"), num_classes=3)
  src = sources.get_source(c.data, "train")
  labels = sorted(src.load(i)["label"] for i in range(len(src)))
  assert labels == [0] * 4 + [1] * 4 + [2] * 4
  batch = _take(_train(src, c, pipeline.Sharding(0, 1), 1), 1)[0]
  assert batch["image"].shape == (8, 32, 32, 3) and batch["mask"].sum() == 8


def test_corrupt_record_is_skipped_and_masked(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  good = _png(np.full((10, 10, 3), 200, np.uint8))
  out = tmp_path / "ar"
  os.makedirs(out)
  writer = ArrayRecordWriter(str(out / "train-00000-of-00001.array_record"), "group_size:1")
  payloads = [good, b"\x89PNG this is not an image", good, good]
  for i, data in enumerate(payloads):
    writer.write(msgpack.packb({"image": data, "label": i % 2, "path": f"{i}.png"}))
  writer.write(b"not msgpack at all \xff\x00")
  writer.close()
  (out / "metadata.json").write_text(json.dumps({
      "class_names": ["a", "b"],
      "splits": {"train": {"num_examples": 5,
                           "shards": ["train-00000-of-00001.array_record"]}}}))
  c = _config(name="array_record", data_dir=str(out), num_classes=2)
  c.batch_size = 5
  src = sources.get_source(c.data, "train")
  with pytest.raises(sources.RecordError):
    src.load(1)
  with pytest.raises(sources.RecordError):
    src.load(4)
  batch = _take(_train(src, c, pipeline.Sharding(0, 1), 1), 1)[0]
  assert batch["mask"].sum() == 3  # two broken records masked, no crash.
  assert np.all(batch["image"][batch["mask"] == 0] == 0)


def test_missing_datasets_say_how_to_prepare(tmp_path):
  c = _config(name="array_record", data_dir=str(tmp_path / "nothing"))
  with pytest.raises(sources.DatasetNotFoundError, match="folder_to_array_record"):
    sources.get_source(c.data, "train")
  c = _config(name="imagenet2012", data_dir=str(tmp_path / "tfds"), num_classes=1000)
  with pytest.raises(sources.DatasetNotFoundError, match="tfds build imagenet2012"):
    sources.get_source(c.data, "train")


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message and len(message) < 400, message
  assert isinstance(error.value, sources.DatasetError)
  return message


def test_num_classes_mismatch_is_reported():
  c = _config(num_classes=1000)
  with pytest.raises(sources.DatasetMismatchError, match="num_classes=1000 .* has 10 classes") \
      as error:
    sources.get_source(c.data, "train")
  assert "--config.data.num_classes=10" in _one_line(error)


def test_empty_source_and_missing_split_are_one_line(tmp_path):
  out = tmp_path / "ar"
  os.makedirs(out)
  (out / "metadata.json").write_text(json.dumps({
      "class_names": ["a", "b"], "splits": {"train": {"num_examples": 0, "shards": []}}}))
  c = _config(name="array_record", data_dir=str(out), num_classes=2)
  with pytest.raises(sources.EmptyDatasetError, match="has no records") as error:
    sources.get_source(c.data, "train")
  _one_line(error)
  with pytest.raises(sources.DatasetNotFoundError, match=r"has splits \['train'\], not 'val'") \
      as error:
    sources.get_source(c.data, "val")
  _one_line(error)
  with pytest.raises(sources.DatasetNotFoundError, match="not 'valid'") as error:
    sources.get_source(_config().data, "valid")
  _one_line(error)


@pytest.mark.parametrize("data_dir", ["", "tfds"])
def test_misspelt_dataset_name_suggests_first_and_logs_the_list(tmp_path, data_dir, caplog):
  c = _config(name="imagenet2021", data_dir=str(tmp_path / data_dir) if data_dir else "")
  with caplog.at_level("INFO"):
    with pytest.raises(sources.UnknownDatasetError) as error:
      sources.get_source(c.data, "train")
  message = _one_line(error)
  assert message.index("did you mean 'imagenet2012'") < 80, message
  assert "cifar10" not in message and "tfds build" not in message  # no list, no recipe.
  assert "cifar10" in caplog.text  # the whole list went to the log.
  c = _config(name="embeded_mnist")
  with pytest.raises(sources.UnknownDatasetError, match="did you mean 'embedded_mnist'"):
    sources.get_source(c.data, "train")


def test_randaugment_magnitude_is_clamped_as_timm_clamps_it():
  image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  for seed in range(40):  # enough draws to hit the magnitude-dependent ops.
    ten = transforms.rand_augment(image, np.random.default_rng(seed), 2, 10)
    fifteen = transforms.rand_augment(image, np.random.default_rng(seed), 2, 15)
    np.testing.assert_array_equal(ten, fifteen)
  unclamped = [np.array_equal(
      transforms.rand_augment(image, np.random.default_rng(s), 2, 10, None),
      transforms.rand_augment(image, np.random.default_rng(s), 2, 15, None)) for s in range(40)]
  assert not all(unclamped)
  aug = ascan_t.get_config().augment
  assert transforms.randaugment_magnitude_max(aug) == 10.0
  aug.randaugment_magnitude_max = 0.0
  assert transforms.randaugment_magnitude_max(aug) is None


def test_color_jitter_is_dropped_with_randaugment_as_in_timm():
  aug = ascan_t.get_config().augment  # RandAugment (2, 15) and colour jitter 0.4.
  kinds = lambda a: [type(op).__name__ for op in pipeline.image_train_ops(32, a)]
  assert "RandAugment" in kinds(aug) and "ColorJitter" not in kinds(aug)
  aug.color_jitter_with_randaugment = True
  assert kinds(aug)[-2:] == ["RandAugment", "ColorJitter"]
  aug.color_jitter_with_randaugment = False
  aug.randaugment_layers = 0
  assert kinds(aug)[-1] == "ColorJitter"


def test_eval_resize_of_small_squares_is_a_config_choice():
  c = _config()
  digit = sources.EmbeddedSource("embedded_mnist", "validation", 0.2).load(0)
  c.data.eval_resize_small_squares = False
  cropped = pipeline.ImageCodec.from_config(c).eval(digit)["image"]
  c.data.eval_resize_small_squares = True
  resized = pipeline.ImageCodec.from_config(c).eval(digit)["image"]
  np.testing.assert_array_equal(resized, transforms.resize(digit["image"], 32))
  np.testing.assert_array_equal(cropped, transforms.eval_crop(digit["image"], 32, 0.875))
  assert not np.array_equal(cropped, resized)
  assert ascan_t.get_config().data.get("eval_resize_small_squares", False) is False  # ImageNet.


def test_transforms_shapes_and_determinism():
  rng_img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  aug = ascan_t.get_config().augment  # the paper's recipe: RandAugment(2, 15), jitter 0.4.
  a = transforms.train_transform(rng_img, np.random.default_rng(5), 32, aug)
  b = transforms.train_transform(rng_img, np.random.default_rng(5), 32, aug)
  c = transforms.train_transform(rng_img, np.random.default_rng(6), 32, aug)
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  e = transforms.eval_crop(rng_img, 32, 0.875)
  assert e.shape == (32, 32, 3)
  for op in transforms.RAND_AUGMENT_OPS:
    out = np.asarray(op(Image.fromarray(rng_img), 1.5, np.random.default_rng(0)))
    assert out.shape == rng_img.shape


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
  """A real tfds ArrayRecord dataset (built here), read without TensorFlow."""
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": _png(np.full((12, 16, 3), 40 * i, np.uint8)), "label": i % 3}

  TinyImages(data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record", download_config=tfds.download.DownloadConfig(
          manual_dir=str(tmp_path)))
  c = _config(name="tiny_images", data_dir=str(tmp_path), num_classes=3)
  src = sources.get_source(c.data, "train")
  assert len(src) == 6
  ex = src.load(2)
  assert ex["image"].shape == (12, 16, 3) and ex["label"] in (0, 1, 2)
  encoded = src.load_encoded(2)  # the same record, image still encoded (for reduced decoding).
  assert isinstance(encoded["image"], sources.EncodedImage) and encoded["label"] == ex["label"]
  np.testing.assert_array_equal(encoded["image"].decode(), ex["image"])
