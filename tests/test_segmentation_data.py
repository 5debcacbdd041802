"""ADE20K data: the converter on a tiny fake folder (round trip, bad labels, missing files,
resume), the record sources' errors, and mmseg's joint image/label augmentation."""
import io
import json
import os
import pickle
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from PIL import Image

from ascan_jax.data import ade20k
from ascan_jax.data import segmentation_transforms as T
from ascan_jax.data.sources import DatasetNotFoundError, RecordError
from ascan_jax.tools import ade20k_to_array_record as tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im)


def test_converter_round_trip_reduces_labels(tmp_path):
  root = tool.make_fake_dataset(str(tmp_path / "ADEChallengeData2016"), num_train=3,
                                num_validation=2)
  out = str(tmp_path / "out")
  meta = tool.convert(root, out, shard_size=2)
  assert {k: v["num_examples"] for k, v in meta["splits"].items()} == {"train": 3,
                                                                       "validation": 2}
  assert meta["splits"]["train"]["shards"] == ["train-00000-of-00002.array_record",
                                               "train-00001-of-00002.array_record"]
  assert len(meta["class_names"]) == 150
  for split, sub in tool.SPLIT_DIRS.items():
    source = ade20k.ADE20KArrayRecordSource(out, split)
    stems = sorted(n[:-4] for n in os.listdir(os.path.join(root, "images", sub)))
    assert len(source) == len(stems) and source.num_classes == 150
    for i, stem in enumerate(stems):
      example = source.load(i)
      raw = _png(os.path.join(root, "annotations", sub, stem + ".png"))
      want = np.where(raw == 0, 255, raw.astype(int) - 1)
      np.testing.assert_array_equal(example["segmentation"], want)
      with Image.open(os.path.join(root, "images", sub, stem + ".jpg")) as im:
        np.testing.assert_array_equal(example["image"], np.asarray(im.convert("RGB")))
      assert example["segmentation"].dtype == example["image"].dtype == np.uint8
  # A second run with the same input skips the finished shards and writes the same metadata.
  shard = os.path.join(out, meta["splits"]["train"]["shards"][0])
  before = os.stat(shard).st_mtime_ns
  assert tool.convert(root, out, shard_size=2) == meta
  assert os.stat(shard).st_mtime_ns == before


def test_label_above_150_stops_the_conversion_naming_the_file(tmp_path):
  root = tool.make_fake_dataset(str(tmp_path / "ade"), num_train=3, num_validation=1)
  bad = os.path.join(root, "annotations", "training", "ADE_train_00000002.png")
  label = _png(bad).copy()
  label[3, 4] = 171
  Image.fromarray(label).save(bad)
  out = str(tmp_path / "out")
  with pytest.raises(tool.ConversionError, match="ADE_train_00000002.png.*171"):
    tool.convert(root, out, shard_size=10)
  assert sorted(os.listdir(out)) == []  # no shard, no partial file, no metadata.json
  with pytest.raises(DatasetNotFoundError, match="ade20k_to_array_record"):
    ade20k.ADE20KArrayRecordSource(out, "train")


def test_missing_annotation_and_missing_input_are_named(tmp_path):
  root = tool.make_fake_dataset(str(tmp_path / "ade"), num_train=2, num_validation=1)
  os.remove(os.path.join(root, "annotations", "validation", "ADE_val_00000001.png"))
  with pytest.raises(tool.ConversionError, match="ADE_val_00000001.jpg has no annotation"):
    tool.convert(root, str(tmp_path / "out"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(tool.ConversionError, match="no images/training"):
    tool.convert(str(tmp_path / "empty"), str(tmp_path / "out"))
  proc = subprocess.run([sys.executable, "-m", "ascan_jax.tools.ade20k_to_array_record",
                         f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out2'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: --input={str(tmp_path / 'nowhere')!r} is not a folder; pass the unzipped "
      f"ADEChallengeData2016 folder (with images/ and annotations/)"]


def test_undecodable_record_raises_record_error(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "validation-00000-of-00001.array_record"),
                             "group_size:1")
  png = io.BytesIO()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
  writer.write(msgpack.packb({"image": b"not a jpeg", "segmentation": png.getvalue(),
                              "name": "broken"}, use_bin_type=True))
  writer.write(b"\x00not msgpack")
  writer.close()
  with open(tmp_path / "metadata.json", "w") as f:
    json.dump({"format": ade20k.FORMAT, "splits": {"validation": {
        "shards": ["validation-00000-of-00001.array_record"]}}}, f)
  source = ade20k.ADE20KArrayRecordSource(str(tmp_path), "validation")
  with pytest.raises(RecordError, match="broken"):
    source.load(0)
  with pytest.raises(RecordError, match="record 1"):
    source.load(1)
  with pytest.raises(DatasetNotFoundError, match="splits"):
    ade20k.ADE20KArrayRecordSource(str(tmp_path), "train")


def test_tfds_source_refuses_instance_annotations_and_names_missing_data(tmp_path):
  with pytest.raises(ValueError, match="instance annotations"):
    ade20k.ADE20KTfdsSource("train", str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="tfds build scene_parse150"):
    ade20k.ADE20KTfdsSource("validation", str(tmp_path), accept_instance_annotations=True)
  annotation = np.zeros((2, 3, 3), np.uint8)
  annotation[0, :, 0] = [0, 1, 100]
  annotation[1, :, 1] = 7  # instance ids (green) do not matter
  labels = ade20k.instance_annotation_to_labels(annotation)
  assert labels[0, 0] == 255 and labels[1].tolist() == [255] * 3
  assert ade20k.CLASS_NAMES[labels[0, 1]] == "bed"
  assert ade20k.CLASS_NAMES[labels[0, 2]] == "flag"
  annotation[0, 0, 0] = 101
  with pytest.raises(RecordError, match="101"):
    ade20k.instance_annotation_to_labels(annotation)


# ---- augmentation -------------------------------------------------------------------------------
PALETTE = np.random.default_rng(0).permutation(np.arange(0, 256, 16))[:12, None] * \
    np.array([1, 0, 0]) + np.array([0, 128, 64])  # 12 colours, red channel 16 apart


def _colour_coded(height=96, width=160, block=24, seed=0):
  """Labels in blocks and an image whose colour is the label's palette colour."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, len(PALETTE), size=(-(-height // block), -(-width // block)))
  seg = np.kron(blocks, np.ones((block, block), int))[:height, :width].astype(np.uint8)
  return {"image": PALETTE[seg].astype(np.uint8), "segmentation": seg, "name": "x"}


def _decode(image):
  return np.abs(image[..., :1].astype(int) - PALETTE[:, 0][None, None, :]).argmin(-1)


def _interior(seg, radius=1):
  """Pixels whose (2 radius + 1)^2 neighbourhood has one label (away from block edges)."""
  h, w = seg.shape
  ok = np.zeros_like(seg, bool)
  for y in range(radius, h - radius):
    for x in range(radius, w - radius):
      window = seg[y - radius:y + radius + 1, x - radius:x + radius + 1]
      ok[y, x] = (window == seg[y, x]).all()
  return ok


def test_rescale_crop_flip_pad_keep_image_and_labels_aligned():
  op = T.compose([T.random_rescale(scale=(160, 64), ratio_range=(0.5, 2.0)),
                  T.random_crop((56, 72), cat_max_ratio=0.75), T.random_flip(0.5),
                  T.pad((96, 96))])
  sizes = set()
  for seed in range(8):
    example = _colour_coded(seed=seed)
    out = op(example, np.random.default_rng(seed))
    image, seg = out["image"], out["segmentation"]
    assert out["name"] == "x" and image.shape == (96, 96, 3) and seg.shape == (96, 96)
    valid = seg != 255
    assert (image[~valid] == 0).all() and valid.any()
    inner = _interior(seg) & valid
    assert inner.sum() > 0.2 * valid.sum()
    np.testing.assert_array_equal(_decode(image)[inner], seg[inner])
    sizes.add(int(valid.sum()))
    assert example["image"].shape == (96, 160, 3)  # the input is left alone
  assert len(sizes) > 1


def test_rescale_follows_mmcv_keep_ratio_rule():
  example = _colour_coded(60, 80)
  out = T.random_rescale(scale=(2048, 512), ratio_range=(1.0, 1.0))(example,
                                                                    np.random.default_rng(0))
  assert out["image"].shape == (512, 683, 3) and out["segmentation"].shape == (512, 683)
  assert set(np.unique(out["segmentation"])) <= set(np.unique(example["segmentation"]))
  evaluated = T.eval_resize((2048, 512))(example, None)
  assert evaluated["image"].shape == (512, 683, 3)
  assert evaluated["segmentation"] is example["segmentation"]  # labels stay at full size


def _crop_test_map():
  """Left half one class (never acceptable); right half 80 % ignore rows and rows of classes 2
  and 3 (acceptable only when the ignore label is left out of the ratio)."""
  seg = np.ones((64, 128), np.uint8)
  rows = np.array([255] * 8 + [2, 3], np.uint8)
  seg[:, 64:] = np.tile(rows, 7)[:64, None]
  return {"image": np.zeros((64, 128, 3), np.uint8), "segmentation": seg}


def _acceptable(seg, ratio):
  labels, counts = np.unique(seg, return_counts=True)
  counts = counts[labels != 255]
  return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_crop_redraws_until_no_class_dominates():
  example = _crop_test_map()
  crop = T.random_crop((32, 32), cat_max_ratio=0.75)
  for seed in range(30):
    out = crop(example, np.random.default_rng(seed))
    assert out["segmentation"].shape == (32, 32)
    assert _acceptable(out["segmentation"], 0.75), seed
  no_rule = T.random_crop((32, 32), cat_max_ratio=1.0)
  results = [_acceptable(no_rule(example, np.random.default_rng(s))["segmentation"], 0.75)
             for s in range(30)]
  assert not all(results)


def test_pad_uses_ignore_label_and_image_value():
  example = {"image": np.full((5, 7, 3), 9, np.uint8), "segmentation": np.zeros((5, 7), np.uint8)}
  out = T.pad((8, 10), image_value=(124, 116, 104))(example, None)
  assert out["image"].shape == (8, 10, 3) and out["segmentation"].shape == (8, 10)
  assert (out["image"][:5, :7] == 9).all() and (out["segmentation"][:5, :7] == 0).all()
  assert (out["segmentation"][5:] == 255).all() and (out["segmentation"][:, 7:] == 255).all()
  assert (out["image"][5:] == [124, 116, 104]).all()


def test_photometric_distortion_changes_only_the_image_reproducibly():
  example = _colour_coded()
  op = T.photometric_distortion()
  outs = [op(example, np.random.default_rng(s)) for s in range(6)]
  assert any(not np.array_equal(o["image"], example["image"]) for o in outs)
  for o in outs:
    assert o["image"].dtype == np.uint8 and o["image"].shape == example["image"].shape
    assert o["segmentation"] is example["segmentation"]
  again = op(example, np.random.default_rng(3))
  np.testing.assert_array_equal(again["image"], outs[3]["image"])


def test_training_pipeline_pickles_for_grain_workers():
  op = pickle.loads(pickle.dumps(T.train_ops(crop_size=(64, 64), scale=(256, 64))))
  out = op(_colour_coded(), np.random.default_rng(0))
  assert out["image"].shape == (64, 64, 3) and out["segmentation"].shape == (64, 64)
  assert out["image"].flags.c_contiguous and out["segmentation"].flags.c_contiguous
