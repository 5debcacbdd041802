"""Aspect-ratio buckets (SDXL style) and the bucketed batch plan.

**Buckets.** SDXL (Podell et al. 2023, appendix "multi-aspect training") trains at 1024² pixel area
on a list of (height, width) buckets, sides multiples of 64. ``SDXL_BUCKETS_1024`` holds the nine
the issue names (height x width, aspect h/w from 1 down to 0.42 and its mirror); other areas scale
every side by ``side / 1024`` and round it to a multiple of ``multiple`` (duplicates dropped), e.g.
``bucket_table(64, 8)`` for the 64² CPU stage. An image goes to the bucket whose aspect ratio is
nearest its own in log space (``nearest_bucket``) and is cropped to that aspect (centre, or at a
random offset in training) and resized to the bucket (``crop_to_bucket``; ``BucketResizeCrop`` is
the ``pp`` op, and takes the bucket from the example's ``bucket`` field when the pipeline set one).

**Plan.** Every global batch comes from one bucket and the whole sequence is a pure function of
``(seed, step)``, so a resumed run, or one on another number of processes, reads the same
batches. With ``G`` the global batch and ``N_b`` the records of bucket ``b``:

* an *epoch* holds ``n_b = N_b // G`` batches of every bucket, ``R = sum n_b`` steps (a bucket's
  last ``N_b mod G`` records wait for the next epoch, where another permutation drops others;
  a bucket with fewer than ``G`` records is never used, ``summary()`` says so);
* step ``s`` is step ``t = s mod R`` of epoch ``e = s // R``; its *slot* is
  ``index_shuffle(t; seed, e)`` (a random order of the epoch's ``R`` batches, so buckets are drawn
  in proportion to their size, without replacement); slot ``k`` is batch ``j = k - cum_b`` of the
  bucket ``b`` with ``cum_b <= k < cum_{b+1}``: no per-step cursor or prefix count is needed;
* example ``i`` of that global batch is record ``order_b[index_shuffle(j G + i; seed, e, b)]``, a
  fresh permutation of the bucket per epoch; process ``p`` of ``P`` reads ``i`` in
  ``[p G/P, (p+1) G/P)``, exactly as ``data.pipeline`` does without buckets.

Memory per host is the record order grouped by bucket (``4 N`` bytes, memory-mapped from
``<cache>.order.npy`` when a cache path is given, so grain workers share the page cache) plus
``O(buckets)``; nothing grows with the number of steps, and any step is O(1) to look up.
Per-record bucket ids are computed once (``compute_bucket_ids``: the image header only, where
the source has ``image_size``) and cached as ``.npy`` next to the data or in a cache folder.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import socket
from typing import Sequence

import numpy as np
from PIL import Image

from ascan_jax.data import transforms

# SDXL's buckets at 1024² (height, width), the nine named in issue 13.
SDXL_BUCKETS_1024 = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
                     (1344, 768), (768, 1344), (1536, 640), (640, 1536))
NO_BUCKET = -1
_SHUFFLE_ROUNDS = 4


def bucket_table(side: int = 1024, multiple: int = 64,
                 base: Sequence[tuple[int, int]] = SDXL_BUCKETS_1024
                 ) -> tuple[tuple[int, int], ...]:
  """``base`` (defined at 1024²) scaled to a ``side``² area, sides rounded to ``multiple``."""
  if side <= 0 or multiple <= 0:
    raise ValueError(f"bucket side and multiple must be positive, got {side} and {multiple}")
  out = []
  for h, w in base:
    bh = max(multiple, int(round(h * side / 1024 / multiple)) * multiple)
    bw = max(multiple, int(round(w * side / 1024 / multiple)) * multiple)
    if (bh, bw) not in out:
      out.append((bh, bw))
  return tuple(out)


def parse_table(text: str | Sequence) -> tuple[tuple[int, int], ...]:
  """'64x64,48x80' (or a sequence of 'HxW' / pairs) -> ((64, 64), (48, 80))."""
  items = text.split(",") if isinstance(text, str) else list(text)
  out = []
  for item in items:
    if isinstance(item, str):
      h, _, w = item.strip().lower().partition("x")
      out.append((int(h), int(w)))
    else:
      out.append((int(item[0]), int(item[1])))
  return tuple(out)


def nearest_bucket(height: int, width: int, table: Sequence[tuple[int, int]]) -> int:
  """The bucket whose aspect ratio is nearest ``height / width`` in log space (first on ties)."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  target = math.log(height / width)
  return int(np.argmin([abs(math.log(h / w) - target) for h, w in table]))


def crop_box(height: int, width: int, bucket: tuple[int, int],
             rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
  """(top, left, h, w): the largest box of the bucket's aspect inside the image, centred (or at
  a uniformly random offset along the cut axis with ``rng``)."""
  bh, bw = bucket
  if height * bw > width * bh:  # the image is taller than the bucket: cut rows.
    ch, cw = max(1, round(width * bh / bw)), width
  else:
    ch, cw = height, max(1, round(height * bw / bh))
  dy, dx = height - ch, width - cw
  if rng is None:
    return dy // 2, dx // 2, ch, cw
  return int(rng.integers(dy + 1)), int(rng.integers(dx + 1)), ch, cw


def crop_to_bucket(image, bucket: tuple[int, int], rng=None, resample=Image.BICUBIC,
                   box=None) -> np.ndarray:
  """``image`` cropped to the bucket's aspect (``crop_box``) and resized to it. ``image`` is a
  uint8 array or a still-encoded ``sources.EncodedImage`` (then decoded at the largest JPEG
  reduction the box allows, ``transforms.crop_and_resize_encoded``)."""
  h, w = image.shape[:2]
  box = box or crop_box(h, w, bucket, rng)
  if hasattr(image, "decode_reduced"):
    return transforms.crop_and_resize_encoded(image, box, tuple(bucket), resample)
  if box == (0, 0, h, w) and (h, w) == tuple(bucket):
    return image
  return transforms.crop_and_resize(image, box, tuple(bucket), resample)


class BucketResizeCrop:
  """pp op: every key cropped and resized to the example's bucket (one box for all keys).

  The bucket is ``example['bucket']`` when present (the bucketed pipeline sets it from the plan),
  else the nearest to the first key's aspect; ``random_crop`` draws the offset from the
  generator (training), else the crop is centred. Writes ``bucket`` (int) back.
  """

  def __init__(self, table: Sequence[tuple[int, int]], keys: Sequence[str] = ("image",),
               label_keys: Sequence[str] = (), random_crop: bool = False):
    self.table = tuple(tuple(b) for b in table)
    self.keys, self.label_keys, self.random_crop = tuple(keys), tuple(label_keys), random_crop

  def __call__(self, example: dict, rng) -> dict:
    h, w = np.shape(example[self.keys[0]])[:2]
    b = example.get("bucket")
    b = nearest_bucket(h, w, self.table) if b is None else int(b)
    box = crop_box(h, w, self.table[b], rng if self.random_crop else None)
    out = dict(example, bucket=b)
    for k in self.keys:
      resample = Image.NEAREST if k in self.label_keys else Image.BICUBIC
      out[k] = crop_to_bucket(example[k], self.table[b], resample=resample, box=box)
    return out


# ---- per-record bucket ids ---------------------------------------------------------------------


def _record_size(source, i: int) -> tuple[int, int]:
  if hasattr(source, "image_size"):
    return source.image_size(i)
  return tuple(np.shape(source.load(i)["image"])[:2])


def table_digest(table: Sequence[tuple[int, int]], description: str = "") -> str:
  text = repr((tuple(map(tuple, table)), description))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest_matches(path: str, digest: str) -> bool:
  meta = path + ".digest"
  return (os.path.exists(path) and os.path.exists(meta)
          and open(meta).read().strip() == digest)


def _save_with_digest(path: str, array: np.ndarray, digest: str) -> None:
  """``array`` as ``.npy`` and ``digest`` in ``<path>.digest``, each atomically; the digest goes
  last, so it never vouches for an older array."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"  # processes may share the folder.
  if os.path.exists(path + ".digest"):
    try:
      os.remove(path + ".digest")
    except FileNotFoundError:  # another process got there first.
      pass
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)
  with open(tmp, "w") as f:
    f.write(digest + "\n")
  os.replace(tmp, path + ".digest")


def compute_bucket_ids(source, table: Sequence[tuple[int, int]], cache_path: str | None = None,
                       progress: bool = False) -> np.ndarray:
  """int16 ``[len(source)]``: each record's bucket (``NO_BUCKET`` for a record that cannot be
  read). Cached at ``cache_path`` (``.npy``) when given; the cache names the table and the
  source's description and is recomputed when either changes."""
  from ascan_jax.data import sources  # the record error type.
  digest = table_digest(table, getattr(source, "description", ""))
  if cache_path and _digest_matches(cache_path, digest):
    cached = np.load(cache_path)
    if len(cached) == len(source):
      return cached
  ids = np.empty(len(source), np.int16)
  rows = range(len(source))
  if progress:
    from tqdm import tqdm
    rows = tqdm(rows, desc="bucket ids", unit="img")
  for i in rows:
    try:
      h, w = _record_size(source, i)
      ids[i] = nearest_bucket(h, w, table)
    except sources.RecordError:
      ids[i] = NO_BUCKET
  if cache_path:
    _save_with_digest(cache_path, ids, digest)
  return ids


# ---- the plan ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts] + [104729]).generate_state(1)[0])


def _shuffle(i: int, n: int, seed: int) -> int:
  from grain.experimental import index_shuffle
  return int(index_shuffle(int(i), max_index=int(n) - 1, seed=seed, rounds=_SHUFFLE_ROUNDS))


class BucketPlan:
  """Which bucket and which records every global batch holds (module docstring).

  ``bucket_ids``: int ``[N]`` per record (``NO_BUCKET`` = never used). ``order_path``: where the
  records grouped by bucket are cached (``.npy``, memory-mapped; pickling then carries only the
  path, so grain workers do not copy it).
  """

  def __init__(self, bucket_ids: np.ndarray, global_batch: int, seed: int,
               num_buckets: int | None = None, order_path: str | None = None):
    ids = np.asarray(bucket_ids)
    if ids.ndim != 1:
      raise ValueError(f"bucket_ids must be one-dimensional, got shape {ids.shape}")
    self.num_records = len(ids)
    self.num_buckets = int(num_buckets if num_buckets is not None else ids.max(initial=-1) + 1)
    if ids.size and ids.max() >= self.num_buckets:
      raise ValueError(f"bucket id {int(ids.max())} >= num_buckets {self.num_buckets}")
    self.global_batch, self.seed = int(global_batch), int(seed)
    if self.global_batch < 1:
      raise ValueError(f"global batch must be >= 1, got {global_batch}")
    self.counts = np.bincount(ids[ids >= 0], minlength=self.num_buckets).astype(np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
    self.batches = self.counts // self.global_batch
    self.cum = np.concatenate([[0], np.cumsum(self.batches)]).astype(np.int64)
    self.steps_per_epoch = int(self.cum[-1])
    if self.steps_per_epoch == 0:
      raise ValueError(f"no bucket holds a full global batch of {self.global_batch} records "
                       f"(records per bucket: {self.counts.tolist()})")
    self.order_path = order_path
    self._order = self._build_order(ids)

  def _build_order(self, ids: np.ndarray) -> np.ndarray:
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:16]
    if self.order_path and _digest_matches(self.order_path, digest):
      return np.load(self.order_path, mmap_mode="r")
    dtype = np.int32 if self.num_records < 2**31 else np.int64
    valid = np.flatnonzero(ids >= 0)
    order = valid[np.argsort(ids[valid], kind="stable")].astype(dtype)
    if not self.order_path:
      return order
    _save_with_digest(self.order_path, order, digest)
    return np.load(self.order_path, mmap_mode="r")

  def __getstate__(self):
    state = dict(self.__dict__)
    if self.order_path:
      state["_order"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._order is None:
      self._order = np.load(self.order_path, mmap_mode="r")

  def batch_at(self, step: int) -> tuple[int, int, int]:
    """``(epoch, bucket, j)``: step ``step`` is batch ``j`` of ``bucket`` in ``epoch``."""
    epoch, t = divmod(int(step), self.steps_per_epoch)
    slot = _shuffle(t, self.steps_per_epoch, _seed(self.seed, epoch))
    bucket = int(np.searchsorted(self.cum, slot, side="right") - 1)
    return epoch, bucket, slot - int(self.cum[bucket])

  def bucket_at(self, step: int) -> int:
    return self.batch_at(step)[1]

  def record_at(self, position: int) -> int:
    """The record at global stream position ``position`` (example ``i`` of step ``s`` is
    position ``s G + i``)."""
    step, i = divmod(int(position), self.global_batch)
    epoch, bucket, j = self.batch_at(step)
    n = int(self.counts[bucket])
    r = _shuffle(j * self.global_batch + i, n, _seed(self.seed, epoch, bucket + 1))
    return int(self._order[int(self.offsets[bucket]) + r])

  def step_records(self, step: int) -> np.ndarray:
    g = self.global_batch
    return np.array([self.record_at(step * g + i) for i in range(g)], np.int64)

  def summary(self) -> dict:
    return {"records_per_bucket": self.counts.tolist(),
            "batches_per_epoch": self.batches.tolist(),
            "steps_per_epoch": self.steps_per_epoch,
            "records_left_out_per_epoch": int((self.counts % self.global_batch).sum()),
            "unused_buckets": [b for b in range(self.num_buckets) if self.batches[b] == 0]}
