"""Random access to webdataset tar shards (the format LAION, DataComp and CC12M ship in).

A webdataset is a set of POSIX tar files whose members are grouped into samples by *key*: the
member path up to the first dot of its file name (``images/00042.jpg`` and ``images/00042.txt``
are the image and the caption of sample ``images/00042``; the extension is the rest, compared in
lower case). A sample here needs an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a caption:
``.txt`` (UTF-8), or else ``.json`` with a ``caption`` (or ``text``) string, as img2dataset writes.
Members of other kinds are ignored; a key without an image is not a sample.

grain needs ``len`` and ``load(i)``, so every shard is *indexed* once: the tar headers are read
(``tarfile`` seeks over the data) and each sample's byte offsets and sizes go into a small
structured ``numpy`` array, saved as ``<shard>.wdsidx.npy`` next to the shard (or under
``index_dir``; kept in memory when neither is writable) and memory-mapped afterwards, so a
restart or a grain worker reopens it for free and a host never holds more than the page cache
asks for. An index whose recorded shard size differs from the shard's is rebuilt. ``load(i)``
then reads exactly the two members of sample ``i`` with one seek each.

Errors: a sample whose image does not decode, whose caption is not UTF-8, or that has no caption
raises ``sources.RecordError`` (the pipeline skips and counts it); a pattern that matches no
shard raises ``sources.DatasetNotFoundError`` naming the pattern; a shard that is not a tar file
raises it naming the shard.
"""
from __future__ import annotations

import bisect
import glob
import io
import json
import os
import re
import tarfile
from typing import Sequence

import numpy as np
from etils import epath

from ascan_jax.data import sources

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
INDEX_SUFFIX = ".wdsidx.npy"
_NO_MEMBER = -1


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _expand_braces(pattern: str) -> list[str]:
  """``shard-{000..003}.tar`` -> the four names (zero-padded as written); no braces -> as is."""
  m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  width = len(lo) if lo.startswith("0") else 0
  out = []
  for k in range(int(lo), int(hi) + 1):
    out += _expand_braces(pattern[:m.start()] + str(k).zfill(width) + pattern[m.end():])
  return out


def _glob(pattern: str) -> list[str]:
  if _is_remote(pattern):
    p = epath.Path(pattern)
    if not any(c in pattern for c in "*?["):
      return [pattern] if p.exists() else []
    return sorted(str(x) for x in epath.Path(str(p.parent)).glob(p.name))
  return sorted(glob.glob(pattern))


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
  """Tar paths of ``spec``: a list of paths, a comma-separated string, a glob, a brace range
  (``shard-{00000..00099}.tar``) or a directory (its ``*.tar``, sorted)."""
  specs = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
  out: list[str] = []
  for s in specs:
    for pattern in _expand_braces(s):
      if not any(c in pattern for c in "*?[") and epath.Path(pattern).is_dir():
        pattern = os.path.join(pattern, "*.tar") if not _is_remote(pattern) else \
            str(epath.Path(pattern) / "*.tar")
      out += _glob(pattern)
  return out


def _split_name(name: str) -> tuple[str, str]:
  """``a/b/000.seg.png`` -> (``a/b/000``, ``seg.png``): key up to the basename's first dot."""
  directory, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(directory, stem) if directory else stem), ext.lower() if dot else ""


def _index_dtype(key_bytes: int) -> np.dtype:
  return np.dtype([("key", f"S{max(1, key_bytes)}"), ("image_offset", "<i8"),
                   ("image_size", "<i8"), ("image_ext", "u1"), ("caption_offset", "<i8"),
                   ("caption_size", "<i8"), ("caption_ext", "u1"), ("shard_bytes", "<i8")])


def build_index(path: str) -> np.ndarray:
  """One row per sample of the shard at ``path`` (module docstring), in member order."""
  samples: dict[str, dict] = {}
  order: list[str] = []
  try:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = _split_name(member.name)
        if ext not in IMAGE_EXTS and ext not in CAPTION_EXTS:
          continue
        if key not in samples:
          samples[key] = {}
          order.append(key)
        slot = "image" if ext in IMAGE_EXTS else "caption"
        previous = samples[key].get(slot)
        # .txt wins over .json for the caption; the first image wins over later ones.
        if previous is None or (slot == "caption" and ext == "txt" and previous[0] != "txt"):
          samples[key][slot] = (ext, member.offset_data, member.size)
  except (tarfile.TarError, EOFError) as e:
    raise sources.DatasetNotFoundError(f"webdataset shard {path} is not a readable tar file "
                                       f"({type(e).__name__}: {e})") from None
  keys = [k for k in order if "image" in samples[k]]
  size = epath.Path(path).stat().length
  rows = np.zeros(len(keys), _index_dtype(max((len(k.encode()) for k in keys), default=1)))
  for row, key in zip(rows, keys):
    s = samples[key]
    ext, off, n = s["image"]
    cext, coff, cn = s.get("caption", ("", _NO_MEMBER, 0))
    row["key"] = key.encode()
    row["image_offset"], row["image_size"] = off, n
    row["image_ext"] = IMAGE_EXTS.index(ext)
    row["caption_offset"], row["caption_size"] = coff, cn
    row["caption_ext"] = CAPTION_EXTS.index(cext) if cext else 255
    row["shard_bytes"] = size
  return rows


def _index_path(shard: str, index_dir: str | None) -> str:
  if index_dir:
    return os.path.join(index_dir, os.path.basename(shard) + INDEX_SUFFIX)
  return shard + INDEX_SUFFIX


def load_or_build_index(shard: str, index_dir: str | None = None) -> np.ndarray:
  """The shard's index: memory-mapped from its file when current, else built (and saved when
  the place is writable; see the module docstring)."""
  path = _index_path(shard, index_dir)
  size = epath.Path(shard).stat().length
  if not _is_remote(path) and os.path.exists(path):
    try:
      index = np.load(path, mmap_mode="r")
      if len(index) and int(index[0]["shard_bytes"]) == size:
        return index  # (an empty index cannot vouch for its shard: rebuilt, which is cheap.)
    except (ValueError, OSError):
      pass  # a damaged index file is rebuilt below.
  index = build_index(shard)
  if _is_remote(path):
    return index
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, index)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
  except OSError:
    return index  # a read-only place: this process keeps it in memory.


def decode_caption(data: bytes, ext: str, where: str) -> str:
  """A ``.txt`` or ``.json`` member -> the caption text; ``RecordError`` when unreadable."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise sources.RecordError(f"{where}: caption is not UTF-8 (byte {e.start}: {e.reason})"
                              ) from None
  if ext == "txt":
    return text.strip()
  try:
    meta = json.loads(text)
  except json.JSONDecodeError as e:
    raise sources.RecordError(f"{where}: caption .json does not parse ({e})") from None
  caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
  if not isinstance(caption, str):
    raise sources.RecordError(f"{where}: caption .json has no 'caption' or 'text' string")
  return caption.strip()


def decode_image(data: bytes, where: str) -> np.ndarray:
  """Encoded bytes -> uint8 RGB [H, W, 3], EXIF orientation applied; ``RecordError`` if broken."""
  from PIL import Image, ImageOps
  try:
    with Image.open(io.BytesIO(data)) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB"), np.uint8)
  except Exception as e:  # PIL raises many kinds for broken files (and for decompression bombs).
    raise sources.RecordError(f"{where}: cannot decode image ({type(e).__name__}: {e})"
                              ) from None


def image_size_of(data: bytes, where: str) -> tuple[int, int]:
  """(height, width) from an encoded image's header (no full decode; EXIF rotation applied)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      orientation = im.getexif().get(0x0112, 1)
  except Exception as e:
    raise sources.RecordError(f"{where}: cannot read image header ({type(e).__name__}: {e})"
                              ) from None
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class WebDatasetSource:
  """Image-caption samples of webdataset tar shards, random access (module docstring).

  ``load(i)`` -> ``{'image': uint8 [H, W, 3], 'caption': str, 'captions': (caption,),
  'key': str}``; ``load_encoded(i)`` the same with ``image`` a ``sources.EncodedImage`` (the
  member's bytes as stored, decoded only when a transform asks); ``image_size(i)`` reads only
  the image header.
  """

  def __init__(self, spec: str | Sequence[str], index_dir: str | None = None):
    self.spec = spec
    self.shards = resolve_shards(spec)
    if not self.shards:
      raise sources.DatasetNotFoundError(
          f"webdataset: no tar shards match {spec!r} (give a directory of .tar files, a glob "
          f"such as /data/laion/*.tar, or a brace range such as /data/shard-{{00000..00099}}.tar)")
    self.index_dir = index_dir
    self._indices: list[np.ndarray] | None = None
    counts = [len(self._index(k)) for k in range(len(self.shards))]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.description = (f"webdataset {spec if isinstance(spec, str) else self.shards[0]} "
                        f"({len(self.shards)} shards, {int(self._starts[-1])} samples)")

  def __getstate__(self):  # grain workers reopen the (memory-mapped) indices themselves.
    state = dict(self.__dict__)
    state["_indices"] = None
    return state

  def _index(self, k: int) -> np.ndarray:
    if self._indices is None:
      self._indices = [None] * len(self.shards)
    if self._indices[k] is None:
      self._indices[k] = load_or_build_index(self.shards[k], self.index_dir)
    return self._indices[k]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, i: int) -> tuple[int, np.void]:
    if not 0 <= i < len(self):
      raise IndexError(f"sample {i} is outside {self.description}")
    k = bisect.bisect_right(self._starts, i) - 1
    return k, self._index(k)[i - int(self._starts[k])]

  def _read(self, k: int, offset: int, size: int) -> bytes:
    with epath.Path(self.shards[k]).open("rb") as f:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise sources.RecordError(f"{self.shards[k]}: truncated member at byte {offset}")
    return data

  def _caption(self, k: int, row, where: str) -> str:
    if int(row["caption_offset"]) == _NO_MEMBER:
      raise sources.RecordError(f"{where}: no .txt or .json caption")
    data = self._read(k, int(row["caption_offset"]), int(row["caption_size"]))
    return decode_caption(data, CAPTION_EXTS[int(row["caption_ext"])], where)

  def key(self, i: int) -> str:
    return self._locate(i)[1]["key"].decode()

  def _load(self, i: int) -> tuple[bytes, dict, str]:
    k, row = self._locate(i)
    key = row["key"].decode()
    where = f"{self.shards[k]}:{key}"
    caption = self._caption(k, row, where)
    data = self._read(k, int(row["image_offset"]), int(row["image_size"]))
    return data, {"caption": caption, "captions": (caption,), "key": key}, where

  def load_encoded(self, i: int) -> dict:
    data, record, where = self._load(i)
    try:
      return {"image": sources.EncodedImage(data), **record}
    except sources.RecordError as e:
      raise sources.RecordError(f"{where}: {e}") from None

  def load(self, i: int) -> dict:
    data, record, where = self._load(i)
    return {"image": decode_image(data, where), **record}

  def image_size(self, i: int) -> tuple[int, int]:
    k, row = self._locate(i)
    data = self._read(k, int(row["image_offset"]), int(row["image_size"]))
    return image_size_of(data, f"{self.shards[k]}:{row['key'].decode()}")


def write_shard(path: str, samples: Sequence[dict]) -> None:
  """Writes a webdataset shard: each sample a dict with ``key`` and ``ext -> bytes|str`` members
  (tests and small conversions; large sets come from img2dataset and the like)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with tarfile.open(tmp, "w") as tar:
    for sample in samples:
      key = sample["key"]
      for ext, value in sample.items():
        if ext == "key":
          continue
        data = value.encode() if isinstance(value, str) else bytes(value)
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
  os.replace(tmp, path)
