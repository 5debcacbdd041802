"""ADE20K (SceneParse150) record sources for semantic segmentation.

Both sources have ``len()``, ``num_classes`` (150), ``class_names``, ``description`` and
``load(i) -> {'image': uint8 [H, W, 3], 'segmentation': uint8 [H, W]}`` with mmseg's
``reduce_zero_label`` applied: the raw value 0 ("other", not one of the 150 classes) becomes the
ignore label 255 and 1..150 become 0..149. ``load`` raises ``sources.RecordError`` for a record
that cannot be decoded (the pipeline skips and counts it) and the constructors raise
``sources.DatasetNotFoundError`` with instructions for a dataset that is not there.

* ``ADE20KArrayRecordSource(directory, split)``: shards written by
  ``python -m ascan_jax.tools.ade20k_to_array_record`` from the official ``ADEChallengeData2016``
  folder (splits ``train``: 20210 images, ``validation``: 2000). Each record is msgpack
  ``{'image': JPEG bytes, 'segmentation': PNG bytes, 'name': file stem}``. This is the source
  for the benchmark.
* ``ADE20KTfdsSource(split, data_dir)``: tfds ``scene_parse150`` through ``tfds.data_source``
  (features ``image`` and ``annotation``; splits ``train`` and ``test``, the latter being ADE's
  2000 validation images, so ``validation`` is accepted as its name). Caution: tfds builds this
  dataset from the Places Challenge 2017 *instance* annotations (``annotations_instance.tar``:
  red channel = one of 100 object categories, green = instance id), not from the 150-class
  semantic maps, so stuff classes (wall, floor, sky, ...) are unlabelled. The source therefore
  refuses to open unless ``accept_instance_annotations=True``; it then maps the 100 object
  categories to their indices among the 150 classes (by name, list from the Places Challenge's
  ``instanceInfo100_train.txt``) and marks every other pixel 255. Training or evaluating on
  that is *not* the ADE20K benchmark.

Class names: the 150 SceneParse150 categories in the order of ``objectInfo150.csv``, with
mmsegmentation's short names (``ADE20KDataset.METAINFO``).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from ascan_jax.data import sources
from ascan_jax.data.sources import DatasetNotFoundError, RecordError

NUM_CLASSES = 150
IGNORE_INDEX = 255
FORMAT = "ade20k msgpack {image: JPEG bytes, segmentation: PNG bytes, name: str}"

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The 100 object categories of the Places Challenge 2017 instance annotations, in id order 1..100.
INSTANCE_CLASS_NAMES = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car",
    "painting", "sofa", "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "box", "column", "signboard", "chest of drawers",
    "counter", "sink", "fireplace", "refrigerator", "stairs", "case", "pool table", "pillow",
    "screen door", "bookcase", "coffee table", "toilet", "flower", "book", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat",
    "arcade machine", "bus", "towel", "light", "truck", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "apparel", "pole", "bannister", "ottoman",
    "bottle", "van", "ship", "fountain", "washer", "plaything", "stool", "barrel", "basket",
    "bag", "minibike", "oven", "ball", "food", "step", "trade name", "microwave", "pot",
    "animal", "bicycle", "dishwasher", "screen", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "plate", "monitor", "bulletin board", "radiator",
    "glass", "clock", "flag",
)


def _reduce_zero_label_table() -> np.ndarray:
  table = (np.arange(256) - 1).astype(np.uint8)
  table[0] = IGNORE_INDEX
  table[IGNORE_INDEX] = IGNORE_INDEX
  return table


REDUCE_ZERO_LABEL = _reduce_zero_label_table()


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
  """mmseg's reduce_zero_label: 0 -> 255 (ignore), k -> k - 1, 255 stays 255."""
  return REDUCE_ZERO_LABEL[np.asarray(raw, np.uint8)]


def decode_label_map(data: bytes) -> np.ndarray:
  """PNG bytes of a single-channel (L or P) label map -> uint8 ``[H, W]`` raw values."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.mode not in ("L", "P"):
        raise RecordError(f"label map has PIL mode {im.mode!r}, expected a single-channel "
                          f"(L or P) class-index PNG")
      return np.asarray(im, np.uint8)
  except RecordError:
    raise
  except Exception as e:  # PIL raises many types for broken files.
    raise RecordError(f"cannot decode label map ({type(e).__name__}: {e})") from None


def _example(image: np.ndarray, raw_label: np.ndarray, what: str) -> dict:
  if image.shape[:2] != raw_label.shape[:2]:
    raise RecordError(f"{what}: image {image.shape[:2]} and label map {raw_label.shape[:2]} "
                      f"differ in size")
  too_big = (raw_label > NUM_CLASSES) & (raw_label != IGNORE_INDEX)
  if too_big.any():
    raise RecordError(f"{what}: label value {int(raw_label[too_big].max())} is above "
                      f"{NUM_CLASSES}")
  return {"image": image, "segmentation": reduce_zero_label(raw_label)}


def converter_instructions(directory: str) -> str:
  return (f"Download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/), unzip it and "
          f"convert it once with:\n  python -m ascan_jax.tools.ade20k_to_array_record "
          f"--input=ADEChallengeData2016 --output={directory or 'OUT_DIR'}")


class ADE20KArrayRecordSource:
  """ADE20K shards written by ``ascan_jax.tools.ade20k_to_array_record``."""

  num_classes = NUM_CLASSES
  class_names = CLASS_NAMES

  def __init__(self, directory: str, split: str):
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.exists(meta_path):
      raise DatasetNotFoundError(f"no converted ADE20K at {directory!r} (missing metadata.json, "
                                 f"or the conversion did not finish). "
                                 f"{converter_instructions(directory)}")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise DatasetNotFoundError(f"{meta_path} was not written by ade20k_to_array_record "
                                 f"(format {meta.get('format')!r}). "
                                 f"{converter_instructions(directory)}")
    if split not in meta["splits"]:
      raise DatasetNotFoundError(f"{directory!r} has ADE20K splits {sorted(meta['splits'])}, "
                                 f"not {split!r}")
    paths = [os.path.join(directory, s) for s in meta["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DatasetNotFoundError(f"{len(missing)} shard(s) of ADE20K {split!r} are missing, e.g. "
                                 f"{missing[0]}; re-run the conversion")
    import grain
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.description = f"ade20k array_record {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    import msgpack
    try:
      record = msgpack.unpackb(self._source[i], raw=False)
      image_bytes, label_bytes = record["image"], record["segmentation"]
      name = record.get("name", str(i))
    except Exception as e:
      raise RecordError(f"cannot parse ADE20K record {i} ({type(e).__name__}: {e})") from None
    try:
      image = sources.decode_image(image_bytes)
      label = decode_label_map(label_bytes)
    except RecordError as e:
      raise RecordError(f"ADE20K record {i} ({name}): {e}") from None
    return _example(image, label, f"ADE20K record {i} ({name})")


TFDS_NAME = "scene_parse150"
TFDS_SPLITS = {"train": "train", "validation": "test", "val": "test", "test": "test"}


def _instance_to_class_table() -> np.ndarray:
  """Instance category id (0..255, red channel) -> reduced 150-class label (255 elsewhere)."""
  table = np.full(256, IGNORE_INDEX, np.uint8)
  for k, name in enumerate(INSTANCE_CLASS_NAMES, start=1):
    table[k] = CLASS_NAMES.index(name)
  return table


INSTANCE_TO_CLASS = _instance_to_class_table()


def instance_annotation_to_labels(annotation: np.ndarray) -> np.ndarray:
  """tfds ``scene_parse150`` annotation ``[H, W, 3]`` (red = instance category 1..100) ->
  uint8 ``[H, W]`` reduced labels among the 150 classes; unlabelled pixels -> 255."""
  annotation = np.asarray(annotation)
  if annotation.ndim != 3 or annotation.shape[-1] < 1:
    raise RecordError(f"annotation of shape {annotation.shape} is not [H, W, C]")
  category = annotation[..., 0].astype(np.uint8)
  if (category > len(INSTANCE_CLASS_NAMES)).any():
    raise RecordError(f"instance category {int(category.max())} is above "
                      f"{len(INSTANCE_CLASS_NAMES)}")
  return INSTANCE_TO_CLASS[category]


def tfds_instructions(data_dir: str) -> str:
  return (f"tfds dataset {TFDS_NAME!r} is not prepared in data_dir={data_dir!r}. Prepare it "
          f"once (TensorFlow is needed for this step only):\n  pip install tensorflow-cpu\n"
          f"  tfds build {TFDS_NAME} --data_dir={data_dir or 'DATA_DIR'} "
          f"--file_format=array_record")


class ADE20KTfdsSource:
  """tfds ``scene_parse150`` (instance annotations: see the module docstring)."""

  num_classes = NUM_CLASSES
  class_names = CLASS_NAMES

  def __init__(self, split: str, data_dir: str, accept_instance_annotations: bool = False):
    if not accept_instance_annotations:
      raise ValueError(
          f"tfds {TFDS_NAME!r} holds the Places Challenge instance annotations (100 object "
          f"categories; wall, floor, sky and the other stuff classes are unlabelled), not the "
          f"150-class ADE20K maps, so it cannot reproduce the benchmark. Use "
          f"ADE20KArrayRecordSource. {converter_instructions('OUT_DIR')}\n(To use the object "
          f"labels anyway pass accept_instance_annotations=True.)")
    if split not in TFDS_SPLITS:
      raise ValueError(f"ADE20K tfds split {split!r} is not one of {sorted(TFDS_SPLITS)}")
    import tensorflow_datasets as tfds
    from etils import epath
    if not data_dir:
      raise DatasetNotFoundError(tfds_instructions(data_dir))
    try:
      builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
      prepared = (epath.Path(builder.data_dir) / "dataset_info.json").exists()
    except Exception as e:
      raise DatasetNotFoundError(f"{tfds_instructions(data_dir)}\n({e})") from None
    if not prepared:
      raise DatasetNotFoundError(tfds_instructions(data_dir))
    try:
      self._source = tfds.data_source(TFDS_NAME, split=TFDS_SPLITS[split], data_dir=data_dir,
                                      download=False)
    except Exception as e:
      raise DatasetNotFoundError(f"{tfds_instructions(data_dir)}\n"
                                 f"({type(e).__name__}: {e})") from None
    self.description = (f"tfds {TFDS_NAME}/{TFDS_SPLITS[split]} in {data_dir} "
                        f"({len(self._source)} records, instance-category labels only)")

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      record = self._source[i]
      image = sources.to_rgb(record["image"])
      label = instance_annotation_to_labels(record["annotation"])
    except RecordError as e:
      raise RecordError(f"tfds {TFDS_NAME} record {i}: {e}") from None
    except Exception as e:  # tfds decodes inside __getitem__.
      raise RecordError(f"cannot decode {TFDS_NAME} record {i} ({type(e).__name__}: {e})") \
          from None
    if image.shape[:2] != label.shape:
      raise RecordError(f"tfds {TFDS_NAME} record {i}: image {image.shape[:2]} and annotation "
                        f"{label.shape} differ in size")
    return {"image": image, "segmentation": label}
