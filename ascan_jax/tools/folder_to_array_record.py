"""Converts a folder of class sub-folders into ArrayRecord shards the training pipeline reads.

  python -m ascan_jax.tools.folder_to_array_record --input=DIR --output=OUT [--eval_fraction=0.1]

``DIR`` holds either ``CLASS/*.jpg`` (then ``--eval_fraction`` of every class, chosen with a
fixed seed, becomes the ``validation`` split) or ``train/CLASS/*`` and ``validation/CLASS/*``
(splits taken as they are). Class indices follow the sorted class-folder names. Each record is a
msgpack map ``{'image': original file bytes, 'label': int, 'path': relative path}``: images are
stored as they are (no re-encoding), so the conversion is fast and lossless. Files that do not
decode are left out, each named in a warning and listed under ``skipped`` in ``metadata.json``.
An input that cannot become a dataset (missing, empty, images without class folders, class
folders without images) is refused with one line, before anything is written. Writes
``OUT/metadata.json`` and ``OUT/<split>-NNNNN-of-NNNNN.array_record``; then train with
``--config.data.name=array_record --config.data.data_dir=OUT --config.data.num_classes=K``.
"""
from __future__ import annotations

import json
import os
import sys

import msgpack
import numpy as np
from absl import app
from absl import flags
from absl import logging
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ConversionError(ValueError):
  """An input that cannot become a dataset; the message says what is wrong with it."""



def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("input", None, "Folder of class sub-folders (or train/ and validation/).")
  flags.DEFINE_string("output", None, "Output folder for the ArrayRecord shards.")
  flags.DEFINE_float("eval_fraction", 0.1, "Share of each class held out when no splits exist.")
  flags.DEFINE_integer("records_per_shard", 10000, "Records per ArrayRecord shard.")
  flags.DEFINE_integer("seed", 0, "Seed of the held-out selection.")


def _class_files(root: str) -> dict[str, list[str]]:
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  out = {}
  for c in classes:
    files = []
    for dirpath, _, names in os.walk(os.path.join(root, c)):
      files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    out[c] = sorted(files)
  return out


def _check_classes(root: str, files: dict[str, list[str]]) -> None:
  if not files:
    loose = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS)]
    hint = (f" (it holds {len(loose)} images directly: put each class in its own sub-folder, "
            "DIR/CLASS/*.jpg)" if loose else "")
    raise ConversionError(f"--input={root!r} has no class sub-folders{hint}")
  empty = sorted(c for c, paths in files.items() if not paths)
  if empty:
    raise ConversionError(f"{root!r}: {len(empty)} class folder(s) hold no images "
                          f"({', '.join(empty[:10])}); extensions read: "
                          f"{', '.join(IMAGE_EXTENSIONS)}")


def plan_splits(root: str, eval_fraction: float, seed: int):
  """(class names, {split: [(path, label)]}) for the folder layout found at ``root``."""
  if not os.path.exists(root):
    raise ConversionError(f"--input={root!r} does not exist")
  if not os.path.isdir(root):
    raise ConversionError(f"--input={root!r} is not a folder")
  if os.path.isdir(os.path.join(root, "train")):
    splits = {}
    train = _class_files(os.path.join(root, "train"))
    _check_classes(os.path.join(root, "train"), train)
    names = sorted(train)
    for split in ("train", "validation"):
      d = os.path.join(root, split)
      if not os.path.isdir(d):
        continue
      files = _class_files(d)
      unknown = sorted(set(files) - set(names))
      if unknown:
        raise ConversionError(f"{d} has classes not in train/: {unknown[:5]}")
      splits[split] = [(f, names.index(c)) for c in names for f in files.get(c, [])]
    return names, splits
  files = _class_files(root)
  _check_classes(root, files)
  names = sorted(files)
  rng = np.random.default_rng(seed)
  splits = {"train": [], "validation": []}
  for label, c in enumerate(names):
    paths = files[c]
    order = rng.permutation(len(paths))
    n_eval = int(round(len(paths) * eval_fraction))
    for rank, i in enumerate(order):
      splits["validation" if rank < n_eval else "train"].append((paths[i], label))
  return names, splits


def _readable(path: str, data: bytes) -> str | None:
  """Why ``data`` is not a decodable image, or None."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()
    return None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f"{type(e).__name__}: {e}"


def write_split(records, output: str, split: str, records_per_shard: int, root: str):
  """Writes the records of one split; images that cannot be decoded are skipped, each named."""
  from array_record.python.array_record_module import ArrayRecordWriter
  readable = []
  skipped = []
  for path, label in records:
    with open(path, "rb") as f:
      why = _readable(path, f.read())
    if why:
      rel = os.path.relpath(path, root)
      logging.warning("skipping %s: cannot decode it (%s)", rel, why)
      skipped.append({"path": rel, "reason": why})
    else:
      readable.append((path, label))
  records = readable
  if not records:
    raise ConversionError(f"split {split!r}: none of its {len(skipped)} images can be decoded "
                          f"(e.g. {skipped[0]['path']}: {skipped[0]['reason']})")
  n = len(records)
  num_shards = max(1, -(-n // records_per_shard))
  shards = []
  order = np.random.default_rng(1).permutation(n)  # mix classes inside shards.
  with tqdm(total=n, desc=f"{split}", unit="img") as bar:
    for s in range(num_shards):
      name = f"{split}-{s:05d}-of-{num_shards:05d}.array_record"
      writer = ArrayRecordWriter(os.path.join(output, name), "group_size:1")
      for i in order[s * records_per_shard:(s + 1) * records_per_shard]:
        path, label = records[i]
        with open(path, "rb") as f:
          data = f.read()
        writer.write(msgpack.packb({"image": data, "label": int(label),
                                    "path": os.path.relpath(path, root)}, use_bin_type=True))
        bar.update(1)
      writer.close()
      shards.append(name)
  return {"num_examples": n, "shards": shards, "skipped": skipped}


def convert(root: str, output: str, eval_fraction: float = 0.1, records_per_shard: int = 10000,
            seed: int = 0) -> dict:
  names, splits = plan_splits(root, eval_fraction, seed)
  os.makedirs(output, exist_ok=True)
  meta = {"class_names": names, "source": os.path.abspath(root), "splits": {},
          "format": "msgpack {image: encoded bytes, label: int, path: str}"}
  for split, records in splits.items():
    if records:
      meta["splits"][split] = write_split(records, output, split, records_per_shard, root)
  with open(os.path.join(output, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def main(argv):
  del argv
  if not flags.FLAGS.input or not flags.FLAGS.output:
    raise app.UsageError("--input and --output are required")
  try:
    meta = convert(flags.FLAGS.input, flags.FLAGS.output, flags.FLAGS.eval_fraction,
                   flags.FLAGS.records_per_shard, flags.FLAGS.seed)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  for split, info in meta["splits"].items():
    if info["skipped"]:
      print(f"{split}: skipped {len(info['skipped'])} undecodable image(s), e.g. "
            f"{info['skipped'][0]['path']} (all listed in metadata.json)")
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"wrote {counts} records of {len(meta['class_names'])} classes to {flags.FLAGS.output}; "
        f"train with --config.data.name=array_record --config.data.data_dir={flags.FLAGS.output} "
        f"--config.data.num_classes={len(meta['class_names'])}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
