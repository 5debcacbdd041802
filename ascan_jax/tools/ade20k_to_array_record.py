"""Converts the official ADE20K scene-parsing folder into ArrayRecord shards.

  python -m ascan_jax.tools.ade20k_to_array_record --input=ADEChallengeData2016 --output=OUT \
      [--shard_size=1000]

``ADEChallengeData2016`` (from ``ADEChallengeData2016.zip``, http://sceneparsing.csail.mit.edu/)
holds ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``;
they become the splits ``train`` and ``validation``. Each record is a msgpack map ``{'image':
the original JPEG bytes, 'segmentation': the original PNG bytes, 'name': file stem}`` (nothing is
re-encoded); ``ascan_jax.data.ade20k.ADE20KArrayRecordSource`` reads them and applies
reduce_zero_label. ``OUT/metadata.json`` (splits, shard names, counts, the 150 class names) is
written last, so a folder without it is not a finished conversion.

Every label map is checked while it is written: it must be a single-channel PNG of the image's
size with values 0..150 (255 is tolerated as "ignore"). A bad label map, an image without its
annotation, an unreadable image or a missing/empty input stops the conversion with one message
naming the file; the shard being written is deleted (shards are written as ``*.partial`` and
renamed when complete). Completed shards are remembered in ``OUT/progress.json`` with a
fingerprint of their files (names and sizes), so a re-run with the same input and shard size
skips them.

``make_fake_dataset(root, ...)`` writes a tiny random folder in the same layout, for tests and
smoke runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

SPLIT_DIRS = {"train": "training", "validation": "validation"}
PROGRESS_FILE = "progress.json"


class ConversionError(Exception):
  """A problem with the input folder; the message names the file."""


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  from absl import flags
  flags.DEFINE_string("input", None, "ADEChallengeData2016 folder (images/, annotations/).")
  flags.DEFINE_string("output", None, "Output folder for the ArrayRecord shards.")
  flags.DEFINE_integer("shard_size", 1000, "Records per ArrayRecord shard.")


def find_pairs(root: str) -> dict[str, list[tuple[str, str, str]]]:
  """``{split: [(image path, annotation path, stem)]}`` sorted by stem."""
  if not root or not os.path.isdir(root):
    raise ConversionError(f"--input={root!r} is not a folder; pass the unzipped "
                          f"ADEChallengeData2016 folder (with images/ and annotations/)")
  splits = {}
  for split, sub in SPLIT_DIRS.items():
    image_dir = os.path.join(root, "images", sub)
    if not os.path.isdir(image_dir):
      continue
    stems = sorted(n[:-4] for n in os.listdir(image_dir) if n.lower().endswith(".jpg"))
    pairs = []
    for stem in stems:
      label = os.path.join(root, "annotations", sub, stem + ".png")
      if not os.path.exists(label):
        raise ConversionError(f"image {os.path.join(image_dir, stem + '.jpg')} has no "
                              f"annotation (expected {label})")
      pairs.append((os.path.join(image_dir, stem + ".jpg"), label, stem))
    if pairs:
      splits[split] = pairs
  if not splits:
    raise ConversionError(f"{root!r} has no images/training/*.jpg or images/validation/*.jpg; "
                          f"pass the unzipped ADEChallengeData2016 folder")
  return splits


def check_pair(image_path: str, label_path: str, label_bytes: bytes) -> None:
  """Raises ``ConversionError`` naming the file when the label map is not usable."""
  import io
  from PIL import Image
  try:
    with Image.open(image_path) as im:  # reads the header only.
      width, height = im.size
  except Exception as e:
    raise ConversionError(f"{image_path}: cannot read the image ({type(e).__name__}: {e})") \
        from None
  try:
    with Image.open(io.BytesIO(label_bytes)) as im:
      mode = im.mode
      label = np.asarray(im) if mode in ("L", "P") else None
  except Exception as e:
    raise ConversionError(f"{label_path}: cannot decode the label map ({type(e).__name__}: "
                          f"{e})") from None
  if label is None:
    raise ConversionError(f"{label_path}: label map has PIL mode {mode!r}; ADE20K class maps are "
                          f"single-channel PNGs (an RGB map may be an instance annotation)")
  if label.shape != (height, width):
    raise ConversionError(f"{label_path}: label map is {label.shape[1]}x{label.shape[0]} but its "
                          f"image is {width}x{height}")
  bad = (label > 150) & (label != 255)
  if bad.any():
    raise ConversionError(f"{label_path}: label value {int(label[bad].max())} is above 150 "
                          f"(ADE20K has classes 1..150 and 0 = other)")


def _fingerprint(pairs) -> str:
  h = hashlib.sha1()
  for image, label, stem in pairs:
    h.update(f"{stem}:{os.path.getsize(image)}:{os.path.getsize(label)}\n".encode())
  return h.hexdigest()


def _write_json(path: str, data) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


def _write_shard(path: str, pairs, bar) -> None:
  import msgpack
  from array_record.python.array_record_module import ArrayRecordWriter
  partial = path + ".partial"
  writer = ArrayRecordWriter(partial, "group_size:1")
  try:
    for image_path, label_path, stem in pairs:
      with open(image_path, "rb") as f:
        image = f.read()
      with open(label_path, "rb") as f:
        label = f.read()
      check_pair(image_path, label_path, label)
      writer.write(msgpack.packb({"image": image, "segmentation": label, "name": stem},
                                 use_bin_type=True))
      bar.update(1)
    writer.close()
  except BaseException:
    writer.close()
    os.remove(partial)
    raise
  os.replace(partial, path)


def convert(root: str, output: str, shard_size: int = 1000) -> dict:
  """Writes the shards and ``metadata.json``; returns the metadata."""
  from tqdm import tqdm
  from ascan_jax.data import ade20k
  if shard_size < 1:
    raise ConversionError(f"--shard_size={shard_size} must be at least 1")
  splits = find_pairs(root)
  os.makedirs(output, exist_ok=True)
  meta_path = os.path.join(output, "metadata.json")
  if os.path.exists(meta_path):
    os.remove(meta_path)  # the folder is not a finished conversion until this run ends.
  progress_path = os.path.join(output, PROGRESS_FILE)
  progress = {}
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
  meta = {"format": ade20k.FORMAT, "dataset": "ade20k", "source": os.path.abspath(root),
          "num_classes": ade20k.NUM_CLASSES, "class_names": list(ade20k.CLASS_NAMES),
          "labels": "raw ADE20K values (0 = other, 1..150 = classes); readers apply "
                    "reduce_zero_label", "splits": {}}
  for split, pairs in splits.items():
    num_shards = -(-len(pairs) // shard_size)
    shards = []
    with tqdm(total=len(pairs), desc=split, unit="img") as bar:
      for s in range(num_shards):
        name = f"{split}-{s:05d}-of-{num_shards:05d}.array_record"
        chunk = pairs[s * shard_size:(s + 1) * shard_size]
        fingerprint = _fingerprint(chunk)
        path = os.path.join(output, name)
        if progress.get(name) == fingerprint and os.path.exists(path):
          bar.update(len(chunk))
        else:
          _write_shard(path, chunk, bar)
          progress[name] = fingerprint
          _write_json(progress_path, progress)
        shards.append(name)
    meta["splits"][split] = {"num_examples": len(pairs), "shards": shards}
  _write_json(meta_path, meta)
  return meta


def make_fake_dataset(root: str, num_train: int = 3, num_validation: int = 2,
                      size: tuple[int, int] = (48, 64), seed: int = 0) -> str:
  """A tiny ADEChallengeData2016-like folder: random JPEGs and PNG label maps (blocks of raw
  values 0..150, sizes varying around ``size``); returns ``root``."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, count in (("training", num_train), ("validation", num_validation)):
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    for i in range(count):
      h, w = size[0] + 8 * int(rng.integers(0, 3)), size[1] + 8 * int(rng.integers(0, 3))
      blocks = rng.integers(0, 151, size=(-(-h // 8), -(-w // 8)), dtype=np.uint8)
      label = np.kron(blocks, np.ones((8, 8), np.uint8))[:h, :w]
      image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      stem = f"{prefix}_{i + 1:08d}"
      Image.fromarray(image).save(os.path.join(root, "images", split, stem + ".jpg"), quality=90)
      Image.fromarray(label).save(os.path.join(root, "annotations", split, stem + ".png"))
  return root


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  if not args.input or not args.output:
    sys.exit("error: --input and --output are required")
  try:
    meta = convert(args.input, args.output, args.shard_size)
  except ConversionError as e:
    sys.exit(f"error: {e}")
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"wrote ADE20K {counts} to {args.output}")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
