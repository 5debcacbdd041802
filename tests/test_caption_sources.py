"""Caption sources: webdataset shards, imagefolder, embedded scenes, tfds adapters, bad input."""
import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ascan_jax.data import caption_pp, caption_sources, imagenet_synonyms, pipeline, sources
from ascan_jax.data import webdataset


def _encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  return buffer.getvalue()


def _image(seed, h=24, w=32):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def shards(tmp_path):
  """Two shards: png+txt, webp+json, jpg+txt in a sub-folder, a corrupt image, a caption that
  is not UTF-8, a sample without caption, and members that are neither image nor caption."""
  root = tmp_path / "wds"
  root.mkdir()
  webdataset.write_shard(str(root / "a-000.tar"), [
      {"key": "s0", "png": _encode(_image(0), "PNG"), "txt": " a red square \n",
       "seg.png": _encode(_image(9), "PNG"), "cls": "3"},
      {"key": "s1", "webp": _encode(_image(1), "WEBP"),
       "json": json.dumps({"caption": "a json caption", "width": 32})},
      {"key": "s2", "png": b"\x89PNG\r\n\x1a\n broken", "txt": "corrupt image"},
  ])
  webdataset.write_shard(str(root / "a-001.tar"), [
      {"key": "dir/s3", "jpg": _encode(_image(3, 40, 20), "JPEG"), "txt": "a tall one"},
      {"key": "s4", "png": _encode(_image(4), "PNG"), "txt": b"caf\xe9 au lait"},
      {"key": "s5", "png": _encode(_image(5), "PNG")},
  ])
  return root


def test_webdataset_samples_index_and_errors(shards):
  src = webdataset.WebDatasetSource(str(shards))
  assert len(src) == 6 and "2 shards" in src.description
  assert [src.key(i) for i in range(6)] == ["s0", "s1", "s2", "dir/s3", "s4", "s5"]
  r0, r1, r3 = src.load(0), src.load(1), src.load(3)
  np.testing.assert_array_equal(r0["image"], _image(0))
  assert (r0["caption"], r0["captions"], r0["key"]) == ("a red square", ("a red square",), "s0")
  np.testing.assert_array_equal(r1["image"], _image(1))  # lossless webp.
  assert r1["caption"] == "a json caption"
  assert r3["image"].shape == (40, 20, 3) and src.image_size(3) == (40, 20)
  encoded = src.load_encoded(3)["image"]  # still encoded: the pipeline decodes on demand.
  assert encoded.format == "JPEG" and encoded.shape == (40, 20, 3)
  with pytest.raises(sources.RecordError, match="s2: cannot read image header"):
    src.load_encoded(2)
  with pytest.raises(sources.RecordError, match="cannot decode image"):
    src.load(2)
  with pytest.raises(sources.RecordError, match="not UTF-8"):
    src.load(4)
  with pytest.raises(sources.RecordError, match="no .txt or .json caption"):
    src.load(5)

  # The index is written next to each shard once and reused; a changed shard is re-indexed.
  index = str(shards / "a-000.tar") + webdataset.INDEX_SUFFIX
  stamp = os.stat(index).st_mtime_ns
  assert len(webdataset.WebDatasetSource(str(shards / "a-*.tar"))) == 6
  assert os.stat(index).st_mtime_ns == stamp
  webdataset.write_shard(str(shards / "a-000.tar"), [{"key": "only", "png": _encode(_image(7),
                                                                                  "PNG"),
                                                      "txt": "one"}])
  again = webdataset.WebDatasetSource(str(shards / "a-{000..001}.tar"))
  assert len(again) == 4 and again.key(0) == "only"


def test_broken_records_are_skipped_and_counted_by_the_pipeline(shards):
  src = webdataset.WebDatasetSource(str(shards))
  config = ml_collections.ConfigDict({"seed": 0, "batch_size": 6, "data": {
      "worker_count": 0, "worker_buffer_size": 1, "shuffle": "index_shuffle"}})
  codec = caption_pp.CaptionImageCodec(16)
  batch = next(iter(pipeline.train_dataset(src, codec, config, pipeline.Sharding(0, 1), 1)))
  assert batch["image"].shape == (6, 16, 16, 3)
  assert batch["mask"].sum() == 3  # s2 (corrupt), s4 (latin-1), s5 (no caption) skipped.
  assert sorted(batch["caption"][batch["mask"] == 1]) == ["a json caption", "a red square",
                                                          "a tall one"]


def test_missing_or_malformed_inputs_are_one_clear_message(tmp_path):
  missing = str(tmp_path / "nowhere" / "*.tar")
  with pytest.raises(sources.DatasetNotFoundError, match="no tar shards match .*nowhere"):
    webdataset.WebDatasetSource(missing)
  (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
  with pytest.raises(sources.DatasetNotFoundError, match="bad.tar is not a readable tar"):
    webdataset.WebDatasetSource(str(tmp_path / "bad.tar"))
  with pytest.raises(sources.DatasetNotFoundError, match="does not exist"):
    caption_sources.config_for_input(str(tmp_path / "nowhere"))
  data = caption_sources.data_config()
  data.name, data.data_dir = "coco_captions", str(tmp_path)
  with pytest.raises(sources.DatasetNotFoundError, match="tfds build coco_captions"):
    caption_sources.get_caption_source(data, "train")
  data.name = "imagefolder"
  with pytest.raises(sources.DatasetNotFoundError, match="metadata.jsonl"):
    caption_sources.get_caption_source(data, "train")


def test_imagefolder_with_metadata_jsonl(tmp_path):
  root = tmp_path / "folder"
  (root / "validation").mkdir(parents=True)
  Image.fromarray(_image(1)).save(root / "a.png")
  Image.fromarray(_image(2, 30, 50)).save(root / "validation" / "b.png")
  (root / "metadata.jsonl").write_text(
      json.dumps({"file_name": "a.png", "text": "first"}) + "\n\n"
      + json.dumps({"file_name": "gone.png", "caption": "missing file"}) + "\n")
  (root / "validation" / "metadata.jsonl").write_text(
      json.dumps({"file_name": "b.png", "text": "held out"}) + "\n")
  data = caption_sources.config_for_input(str(root))
  assert data.name == "imagefolder"
  train = caption_sources.get_caption_source(data, "train")
  assert len(train) == 2 and train.load(0)["caption"] == "first"
  np.testing.assert_array_equal(train.load(0)["image"], _image(1))
  with pytest.raises(sources.RecordError, match="gone.png"):
    train.load(1)
  val = caption_sources.get_caption_source(data, "validation")
  assert val.image_size(0) == (30, 50) and val.load(0)["key"] == "b.png"
  (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
  with pytest.raises(ValueError, match=r"metadata.jsonl: line 1 needs .* 'text'"):
    caption_sources.get_caption_source(data, "train")


def test_embedded_scenes_at_several_sizes():
  data = caption_sources.data_config()
  data.scenes.sizes, data.scenes.train_examples = ("32x32", "32x64"), 6
  src = caption_sources.get_caption_source(data, "train")
  shapes = [src.load(i)["image"].shape[:2] for i in range(6)]
  assert shapes == [(32, 32), (32, 64)] * 3 == [src.image_size(i) for i in range(6)]
  record = src.load(3)
  assert record["captions"] == (record["caption"],) and record["key"] == "train/00000003"
  assert record["segmentation"].shape == (32, 64)


def test_imagenet_as_text_to_image_captions():
  synonyms = imagenet_synonyms.load()
  assert len(synonyms) == 1000
  tfds_labels = os.path.join(os.path.dirname(pytest.importorskip("tensorflow_datasets").__file__),
                             "datasets", "imagenet2012", "labels.txt")
  if os.path.exists(tfds_labels):  # the label order of tfds imagenet2012.
    assert [w for w, _ in synonyms] == open(tfds_labels).read().split()
  assert caption_sources.imagenet_captions(0) == ("a photo of a tench", "a photo of a Tinca tinca")
  eels = caption_sources.imagenet_captions(390)
  assert synonyms[390][1][0] == "eel" and eels[0] == "a photo of an eel"
  # A codec draws one synonym per example; over positions every synonym appears.
  pick = caption_pp.PickCaption()
  record = {"caption": eels[0], "captions": eels}
  drawn = {pick(record, np.random.default_rng([0, g]))["caption"] for g in range(64)}
  assert drawn == set(eels) and pick(record, None)["caption"] == eels[0]


def test_coco_record_keeps_every_caption():
  record = {"image": _image(3), "image/id": np.int64(42),
            "captions": {"text": np.array([b"a cat on a mat ", b"two cats"]),
                         "id": np.array([1, 2])}}
  out = caption_sources.coco_record(record)
  assert out["captions"] == ("a cat on a mat", "two cats") and out["key"] == "42"
  assert out["caption"] == "a cat on a mat" and out["image"].shape == (24, 32, 3)
