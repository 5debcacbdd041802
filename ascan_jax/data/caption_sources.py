"""Image-caption sources for text-to-image: one entry point, ``get_caption_source(data, split)``.

Every source has ``len()``, ``description``, ``load(i)`` and ``image_size(i) -> (h, w)``; ``load``
returns a dict with at least ``image`` (uint8 [H, W, 3]), ``caption`` (str, the record's
canonical caption), ``captions`` (tuple of str: every caption the record may be trained with,
``caption`` first; a codec picks one, e.g. ``caption_pp.PickCaption``) and ``key`` (str, stable
across runs: recaptioning and curation reports use it). ``load`` raises ``sources.RecordError``
for a record that cannot be read (the pipeline skips and counts it) and construction raises
``sources.DatasetNotFoundError`` for a dataset that is not where the config says. Sources that
hold encoded images (webdataset, imagefolder, curated) also have ``load_encoded(i)``, whose
``image`` is a ``sources.EncodedImage`` (decoded on demand, JPEGs at a reduced size when the
target is small), the contract of ``data.pipeline``.

``data.name`` picks the source:

* ``embedded_digit_scenes`` (no download): ``digit_scenes.DigitScenesSource`` (captioned colour
  scenes of real MNIST digits, with ``segmentation``, ``metadata``, ``objects``), ``data.scenes``
  giving mode, seed, canvas sizes and the number of scenes per split. Several sizes
  (``data.scenes.sizes=('64x64', '48x80', ...)``) interleave: scene ``i`` has size
  ``sizes[i % len(sizes)]``, the multi-aspect data of the bucketed stage.
* ``webdataset``: tar shards (``data.webdataset``; ``.jpg``/``.png``/``.webp`` with ``.txt`` or
  ``.json`` captions). ``data.data_dir`` is a directory, a glob or a brace range; split ``s``
  reads ``<dir>/<s>/*.tar`` when that folder exists, else ``<dir>/<s>-*.tar``, else (train only)
  ``data.data_dir`` itself.
* ``imagefolder``: the Hugging Face imagefolder convention, a folder with ``metadata.jsonl`` (one
  JSON object per line: ``file_name`` relative to the folder, ``text`` the caption; ``caption`` is
  accepted too). Split ``s`` reads ``<dir>/<s>/metadata.jsonl``, else (train only)
  ``<dir>/metadata.jsonl``.
* ``caption_array_record``: the ArrayRecord shards ``tools.curate`` writes.
* ``coco_captions``: tfds ``coco_captions`` (COCO 2014 with the Karpathy splits ``train``, ``val``,
  ``test``, ``restval``) through ``tfds.data_source`` (prepared as ArrayRecord in
  ``data.data_dir``); the five captions of an image are its ``captions``.
* ``imagenet2012``: ImageNet-1K as text-to-image (the paper's stage 1, following SD3): tfds
  ``imagenet2012``, captioned "a photo of a <name>" for every WordNet synonym of the class
  (``imagenet_synonyms``); ``caption`` is the first, a codec draws one per example.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from ascan_jax import fileio
from ascan_jax.data import digit_scenes
from ascan_jax.data import imagenet_synonyms
from ascan_jax.data import sources
from ascan_jax.data import webdataset

SOURCES = ("embedded_digit_scenes", "webdataset", "imagefolder", "caption_array_record",
           "coco_captions", "imagenet2012")
CURATED_FORMAT = "ascan_jax curated image-caption records v1"
METADATA_JSONL = "metadata.jsonl"
IMAGENET_TEMPLATE = "a photo of {article} {name}"


def data_config() -> ml_collections.ConfigDict:
  """The ``config.data`` keys of the caption sources (a text-to-image task starts from these)."""
  c = ml_collections.ConfigDict()
  c.name = "embedded_digit_scenes"  # one of SOURCES.
  c.data_dir = ""  # shards / folder / curated output / tfds data_dir (see the module docstring).
  c.index_dir = ""  # webdataset: where shard indices go ('' = next to the shards).
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 256  # square training size; with buckets, the side of the bucket area.
  c.holdout_fraction = 0.2  # embedded scenes: share of the MNIST digits held out.
  c.caption_template = IMAGENET_TEMPLATE  # imagenet2012: {article} and {name} of a synonym.
  c.scenes = ml_collections.ConfigDict()
  c.scenes.mode = "scenes"  # scenes | single_digit ("a photo of a seven").
  c.scenes.sizes = ("64x64",)  # canvas HxW; several interleave (multi-aspect data).
  c.scenes.train_examples = 20000
  c.scenes.eval_examples = 1000
  c.scenes.seed = 0
  return c


def parse_size(text: str) -> tuple[int, int]:
  """'64x96' -> (64, 96) (height x width)."""
  try:
    h, w = (int(v) for v in str(text).lower().split("x"))
  except ValueError:
    raise ValueError(f"a size is written HEIGHTxWIDTH such as '64x96', not {text!r}") from None
  return h, w


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


# ---- embedded digit scenes -------------------------------------------------------------------


class ScenesSource:
  """``DigitScenesSource`` at one or several canvas sizes, with ``captions`` and ``key``."""

  def __init__(self, split: str, sizes, num_examples: int, *, mode: str = "scenes",
               seed: int = 0, holdout_fraction: float = 0.2):
    self.sizes = [parse_size(s) if isinstance(s, str) else tuple(s) for s in sizes]
    if not self.sizes:
      raise ValueError("data.scenes.sizes is empty")
    k = len(self.sizes)
    self._parts = [digit_scenes.DigitScenesSource(
        split, height=h, width=w, num_examples=max(1, math.ceil(num_examples / k)), seed=seed,
        mode=mode, holdout_fraction=holdout_fraction) for h, w in self.sizes]
    self.num_examples = int(num_examples)
    self.split = split
    self.description = (f"embedded_digit_scenes/{split} ({mode}, {num_examples} scenes of "
                        f"{', '.join(f'{h}x{w}' for h, w in self.sizes)}, seed {seed})")

  def __len__(self) -> int:
    return self.num_examples

  def image_size(self, i: int) -> tuple[int, int]:
    return self.sizes[i % len(self.sizes)]

  def load(self, i: int) -> dict:
    if not 0 <= i < self.num_examples:
      raise IndexError(f"scene {i} is outside {self.description}")
    k = len(self.sizes)
    record = self._parts[i % k].load(i // k)
    record["captions"] = (record["caption"],)
    record["key"] = f"{self.split}/{i:08d}"
    return record


# ---- image folder with metadata.jsonl ----------------------------------------------------------


def read_metadata_jsonl(path: str) -> list[tuple[str, str]]:
  """``(file_name, caption)`` per line of a Hugging Face ``metadata.jsonl``."""
  rows = []
  for line_no, row in fileio.json_lines(path):
    name, text = row.get("file_name"), row.get("text", row.get("caption"))
    if not isinstance(name, str) or not isinstance(text, str):
      raise ValueError(f"{path}: line {line_no} needs a 'file_name' string and a 'text' (or "
                       f"'caption') string, got {sorted(row)}")
    rows.append((name, text.strip()))
  return rows


class ImageFolderSource:
  """Images listed in a ``metadata.jsonl`` (Hugging Face imagefolder), random access."""

  def __init__(self, directory: str, split: str):
    candidates = [os.path.join(directory, split, METADATA_JSONL)]
    if split == "train":
      candidates.append(os.path.join(directory, METADATA_JSONL))
    found = [p for p in candidates if epath.Path(p).exists()]
    if not found:
      raise sources.DatasetNotFoundError(
          f"imagefolder: no {METADATA_JSONL} for split {split!r} in {directory!r} (looked for "
          f"{' and '.join(candidates)}); each line is {{\"file_name\": \"a.jpg\", "
          f"\"text\": \"a caption\"}}")
    self.root = os.path.dirname(found[0])
    self.rows = read_metadata_jsonl(found[0])
    self.description = f"imagefolder {found[0]} ({len(self.rows)} images)"

  def __len__(self) -> int:
    return len(self.rows)

  def _bytes(self, i: int) -> tuple[bytes, str]:
    name, _ = self.rows[i]
    path = os.path.join(self.root, name)
    try:
      return epath.Path(path).read_bytes(), path
    except OSError as e:
      raise sources.RecordError(f"{path}: cannot read ({type(e).__name__}: {e})") from None

  def load_encoded(self, i: int) -> dict:
    name, caption = self.rows[i]
    data, path = self._bytes(i)
    try:
      image = sources.EncodedImage(data)
    except sources.RecordError as e:
      raise sources.RecordError(f"{path}: {e}") from None
    return {"image": image, "caption": caption, "captions": (caption,), "key": name}

  def load(self, i: int) -> dict:
    name, caption = self.rows[i]
    data, path = self._bytes(i)
    return {"image": webdataset.decode_image(data, path), "caption": caption,
            "captions": (caption,), "key": name}

  def image_size(self, i: int) -> tuple[int, int]:
    data, path = self._bytes(i)
    return webdataset.image_size_of(data, path)


# ---- curated ArrayRecord shards (tools.curate) ---------------------------------------------------


def encode_curated(record: dict) -> bytes:
  """A curated record: ``key``, ``image`` (encoded bytes as the source stored them, else PNG),
  ``caption``, ``captions``, ``height``, ``width``, ``source_index``."""
  import msgpack
  return msgpack.packb({k: (list(v) if isinstance(v, tuple) else v) for k, v in record.items()},
                       use_bin_type=True)


class CuratedSource:
  """The shards ``tools.curate`` writes (``metadata.json`` + ``<split>-*.array_record``)."""

  def __init__(self, directory: str, split: str):
    path = os.path.join(directory, "metadata.json")
    if not epath.Path(path).exists():
      raise sources.DatasetNotFoundError(
          f"no curated dataset at {directory!r} (missing metadata.json); write one with\n"
          f"  python -m ascan_jax.tools.curate --input=SOURCE --output={directory or 'OUT'}")
    meta = json.loads(epath.Path(path).read_text())
    if meta.get("format") != CURATED_FORMAT:
      raise sources.DatasetNotFoundError(f"{path} is not a curated dataset (format "
                                         f"{meta.get('format')!r})")
    if split not in meta["splits"]:
      raise sources.DatasetNotFoundError(f"{directory!r} has splits {sorted(meta['splits'])}, "
                                         f"not {split!r}")
    shards = [os.path.join(directory, s) for s in meta["splits"][split]["shards"]]
    missing = [s for s in shards if not epath.Path(s).exists()]
    if missing:
      raise sources.DatasetNotFoundError(f"{len(missing)} shard(s) of {directory!r} are missing, "
                                         f"e.g. {missing[0]}; re-run tools.curate")
    import grain
    self._source = grain.sources.ArrayRecordDataSource(shards)
    self.meta = meta
    self.description = f"curated {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def _record(self, i: int) -> dict:
    import msgpack
    try:
      record = msgpack.unpackb(self._source[i], raw=False)
      record["captions"] = tuple(record["captions"])
    except Exception as e:
      raise sources.RecordError(f"{self.description}: cannot parse record {i} "
                                f"({type(e).__name__}: {e})") from None
    return record

  def load_encoded(self, i: int) -> dict:
    record = self._record(i)
    record["image"] = sources.EncodedImage(record["image"])
    return record

  def load(self, i: int) -> dict:
    record = self._record(i)
    record["image"] = webdataset.decode_image(record["image"],
                                              f"{self.description}:{record['key']}")
    return record

  def image_size(self, i: int) -> tuple[int, int]:
    record = self._record(i)
    return int(record["height"]), int(record["width"])


# ---- tfds: coco_captions and ImageNet as text-to-image ---------------------------------------


def tfds_instructions(name: str, data_dir: str) -> str:
  d = data_dir or "DATA_DIR"
  if name == "imagenet2012":
    return sources.imagenet_instructions(name, data_dir)
  return (f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r}. Prepare it once "
          f"(downloads COCO 2014 and the Karpathy splits; needs TensorFlow for this step only):\n"
          f"  pip install tensorflow-cpu\n"
          f"  tfds build {name} --data_dir={d} --file_format=array_record\n"
          f"then pass --config.data.data_dir={d}")


def open_tfds(name: str, split: str, data_dir: str):
  """``tfds.data_source`` of a prepared dataset; ``DatasetNotFoundError`` with the recipe."""
  if not data_dir:
    raise sources.DatasetNotFoundError(tfds_instructions(name, data_dir))
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
      raise FileNotFoundError(f"{builder.data_dir}/dataset_info.json")
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise sources.DatasetNotFoundError(f"{tfds_instructions(name, data_dir)}\n"
                                       f"({type(e).__name__}: {e})") from None


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def coco_record(record: dict) -> dict:
  """A tfds ``coco_captions`` example -> a caption record (every caption kept)."""
  captions = tuple(_text(t).strip() for t in np.asarray(record["captions"]["text"]).tolist())
  if not captions:
    raise sources.RecordError(f"coco image {record.get('image/id')} has no caption")
  return {"image": sources.to_rgb(record["image"]), "caption": captions[0],
          "captions": captions, "key": str(int(record["image/id"]))}


def imagenet_captions(label: int, template: str = IMAGENET_TEMPLATE) -> tuple[str, ...]:
  """Every caption of class ``label``: the template filled with each WordNet synonym."""
  _, lemmas = imagenet_synonyms.load()[label]
  return tuple(template.format(article=_article(name), name=name) for name in lemmas)


class TfdsCaptionSource:
  """``coco_captions`` or ``imagenet2012`` (as text-to-image) through ``tfds.data_source``."""

  def __init__(self, name: str, split: str, data_dir: str,
               template: str = IMAGENET_TEMPLATE):
    self.name, self.template = name, template
    self._source = open_tfds(name, split, data_dir)
    self.description = f"tfds {name}/{split} in {data_dir} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      record = self._source[i]
    except Exception as e:  # tfds decodes inside __getitem__.
      raise sources.RecordError(f"{self.description}: cannot decode record {i} "
                                f"({type(e).__name__}: {e})") from None
    if self.name == "coco_captions":
      return coco_record(record)
    captions = imagenet_captions(int(record["label"]), self.template)
    return {"image": sources.to_rgb(record["image"]), "caption": captions[0],
            "captions": captions, "label": int(record["label"]),
            "key": _text(record.get("file_name", f"{i}"))}

  def image_size(self, i: int) -> tuple[int, int]:
    return tuple(self.load(i)["image"].shape[:2])


# ---- the entry point -----------------------------------------------------------------------------


def webdataset_location(data_dir: str, split: str) -> str:
  """The shards of ``split`` (see the module docstring)."""
  if not data_dir:
    raise sources.DatasetNotFoundError("webdataset: data.data_dir is empty (a directory of "
                                       ".tar shards, a glob or a brace range)")
  if not any(c in data_dir for c in "*?{,"):
    for candidate in (os.path.join(data_dir, split),
                      os.path.join(data_dir, f"{split}-*.tar")):
      if webdataset.resolve_shards(candidate):
        return candidate
  if split == "train":
    return data_dir
  raise sources.DatasetNotFoundError(f"webdataset: no shards of split {split!r} under "
                                     f"{data_dir!r} (looked for {split}/*.tar and {split}-*.tar)")


def get_caption_source(data_config, split: str) -> Any:
  """The source ``data_config.name`` names, for ``split`` (module docstring)."""
  name = data_config.name
  if name == "embedded_digit_scenes":
    s = data_config.scenes
    n = s.train_examples if split == "train" else s.eval_examples
    src = ScenesSource(split, s.sizes, n, mode=s.mode, seed=s.seed,
                       holdout_fraction=data_config.holdout_fraction)
  elif name == "webdataset":
    src = webdataset.WebDatasetSource(webdataset_location(data_config.data_dir, split),
                                      index_dir=data_config.get("index_dir") or None)
  elif name == "imagefolder":
    src = ImageFolderSource(data_config.data_dir, split)
  elif name == "caption_array_record":
    src = CuratedSource(data_config.data_dir, split)
  elif name in ("coco_captions", "imagenet2012"):
    src = TfdsCaptionSource(name, split, data_config.data_dir,
                            data_config.get("caption_template", IMAGENET_TEMPLATE))
  else:
    raise ValueError(f"data.name {name!r} is not a caption source; choose one of {SOURCES}")
  if len(src) == 0:
    raise sources.DatasetNotFoundError(f"{src.description} is empty")
  return src


def config_for_input(spec: str, base: ml_collections.ConfigDict | None = None
                     ) -> ml_collections.ConfigDict:
  """A data config for a tool's ``--input``: ``embedded_digit_scenes``, ``tfds:NAME[@DIR]``, a
  folder with ``metadata.jsonl``, a curated output folder, or webdataset shards (a folder of
  ``.tar`` files, a glob, a brace range)."""
  c = ml_collections.ConfigDict(base.to_dict()) if base is not None else data_config()
  if spec == "embedded_digit_scenes":
    c.name = spec
  elif spec.startswith("tfds:"):
    name, _, data_dir = spec[len("tfds:"):].partition("@")
    c.name, c.data_dir = name, data_dir or c.data_dir
  else:
    path = epath.Path(spec)
    is_dir = not any(ch in spec for ch in "*?{,") and path.is_dir()
    if is_dir and (path / "metadata.json").exists():
      c.name = "caption_array_record"
    elif is_dir and ((path / METADATA_JSONL).exists()
                     or any((path / d / METADATA_JSONL).exists()
                            for d in ("train", "validation", "test"))):
      c.name = "imagefolder"
    elif is_dir or webdataset.resolve_shards(spec):
      c.name = "webdataset"
    else:
      raise sources.DatasetNotFoundError(
          f"--input={spec!r} does not exist (give a folder of .tar shards, a glob or brace range "
          f"of shards, a folder with {METADATA_JSONL}, a curated output folder, "
          f"tfds:coco_captions@DATA_DIR, tfds:imagenet2012@DATA_DIR or embedded_digit_scenes)")
    c.data_dir = spec
  return c
