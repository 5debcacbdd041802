"""Cached VAE latents: the ArrayRecord formats ``tools.cache_latents`` writes, and their readers.

**Class-conditional caches** (format 1). A cache folder holds ``metadata.json`` and
``<split>-NNNNN-of-NNNNN.array_record`` shards. Each record is a msgpack map with the posterior
``mean`` and ``std`` of the image and of its horizontal flip (float16 bytes, ``[h, w, c]``), the
``label`` and the source ``index``. Keeping mean and std (not one sample) lets every epoch draw a
fresh latent; keeping the flip lets training flip without decoding. Metadata records the VAE
(path, config, weights hash) and the latent shape. ``LatentCodec`` turns a record into
``{'latent': float32 [h, w, c], 'label'}``: in training a random flip and
``z = mean + std * noise`` (numpy generator seeded by the pipeline), in evaluation the
un-flipped mean; both scaled by the VAE's scaling/shift factors (the "model latents" a diffusion
model is trained on).

**Caption caches** (format 2, text-to-image; ``metadata.json`` has ``"format": CAPTION_FORMAT``).
Every image is stored at the size of its aspect-ratio bucket (``buckets``), so latent shapes vary
per record: a record is ``{index, key, bucket, shape, mean, std[, mean_flip, std_flip], captions}``
(float16 latents of the bucket's shape; ``captions`` every prompt the image may be trained with,
the canonical one first). Next to each shard, ``<shard>.buckets.npy`` (int16 bucket per record,
in record order) lets ``CaptionLatentSource.bucket_ids`` build a ``buckets.BucketPlan`` without
reading the records, and ``<shard>.prompts.json`` lists the shard's distinct prompts (the input
of the text pass). The prompts' encoder outputs live once per unique prompt in the text cache
(``text_cache``). ``CaptionLatentCodec`` produces exactly the fields the text-to-image task
reads: ``latent`` float32 ``[h, w, c]`` (scaled like ``LatentCodec``'s), ``text_embedding``
float32 ``[L, D]`` (stored bfloat16; zeros past the prompt's tokens), ``text_mask`` int32
``[L]`` and ``caption`` str (host-only); training draws one of the record's prompts and a latent
sample (and a flip, when the cache has flips and the codec is asked to), evaluation takes the
first prompt and the mean. ``placeholder(bucket)`` has the bucket's shapes.
"""
from __future__ import annotations

import json
import os

import msgpack
import numpy as np

from ascan_jax.data import sources as sources_lib

FIELDS = ("mean", "std", "mean_flip", "std_flip")


def encode_record(label: int, index: int, arrays: dict[str, np.ndarray]) -> bytes:
  shape = list(arrays["mean"].shape)
  payload = {"label": int(label), "index": int(index), "shape": shape}
  for k in FIELDS:
    payload[k] = np.asarray(arrays[k], np.float16).tobytes()
  return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  record = msgpack.unpackb(data, raw=False)
  shape = tuple(record["shape"])
  out = {"label": int(record["label"]), "index": int(record["index"])}
  for k in FIELDS:
    out[k] = np.frombuffer(record[k], np.float16).reshape(shape).astype(np.float32)
  return out


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, "metadata.json")
  if not os.path.exists(path):
    raise sources_lib.DatasetNotFoundError(
        f"no latent cache at {directory!r} (missing metadata.json). Write one with:\n"
        f"  python -m ascan_jax.tools.cache_latents --config=CONFIG --vae=VAE_DIR "
        f"--output={directory or 'OUT_DIR'}")
  with open(path) as f:
    return json.load(f)


class LatentSource:
  """Random access to one split of a latent cache."""

  def __init__(self, directory: str, split: str):
    meta = read_metadata(directory)
    if meta.get("format") == CAPTION_FORMAT:
      raise sources_lib.DatasetNotFoundError(
          f"{directory!r} is a caption latent cache (text-to-image); read it with "
          "CaptionLatentSource")
    splits = meta.get("splits", {})
    if split not in splits or not splits[split].get("complete", False):
      done = sorted(k for k, v in splits.items() if v.get("complete"))
      raise sources_lib.DatasetNotFoundError(
          f"latent cache {directory!r} has no complete split {split!r} (complete: {done}); "
          f"run the caching tool with --split={split} (it resumes where it stopped)")
    import grain
    paths = [os.path.join(directory, s) for s in splits[split]["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.meta = meta
    self.num_classes = int(meta["num_classes"])
    self.latent_shape = tuple(meta["latent_shape"])
    self.description = f"latents {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      return decode_record(self._source[i])
    except Exception as e:
      raise sources_lib.RecordError(f"cannot decode latent record {i} ({e})") from None


class LatentCodec:
  """Cached posterior -> scaled float32 latents (see the module docstring)."""

  def __init__(self, meta: dict, flip: bool = True):
    self.shape = tuple(meta["latent_shape"])
    self.scale = float(meta["scaling_factor"])
    self.shift = float(meta.get("shift_factor") or 0.0)
    self.flip = flip

  def _scaled(self, z: np.ndarray) -> np.ndarray:
    return ((z - self.shift) * self.scale).astype(np.float32)

  def placeholder(self) -> dict:
    return {"latent": np.zeros(self.shape, np.float32), "label": 0}

  def train(self, example: dict, rng: np.random.Generator) -> dict:
    flip = self.flip and rng.random() < 0.5
    mean = example["mean_flip" if flip else "mean"]
    std = example["std_flip" if flip else "std"]
    z = mean + std * rng.standard_normal(mean.shape, np.float32)
    return {"latent": self._scaled(z), "label": example["label"]}

  def eval(self, example: dict) -> dict:
    return {"latent": self._scaled(example["mean"]), "label": example["label"]}


# ---- caption caches (format 2) -------------------------------------------------------------------

CAPTION_FORMAT = "ascan_jax caption latents v2"
BUCKETS_SUFFIX = ".buckets.npy"
PROMPTS_SUFFIX = ".prompts.json"


def encode_caption_record(index: int, key: str, bucket: int, captions, arrays: dict) -> bytes:
  """A format-2 record; ``arrays`` has ``mean`` and ``std`` (and optionally the flips)."""
  shape = list(arrays["mean"].shape)
  payload = {"index": int(index), "key": str(key), "bucket": int(bucket), "shape": shape,
             "captions": [str(c) for c in captions]}
  for k in FIELDS:
    if k in arrays:
      payload[k] = np.asarray(arrays[k], np.float16).tobytes()
  return msgpack.packb(payload, use_bin_type=True)


def decode_caption_record(data: bytes) -> dict:
  record = msgpack.unpackb(data, raw=False)
  shape = tuple(record["shape"])
  out = {"index": int(record["index"]), "key": record["key"], "bucket": int(record["bucket"]),
         "captions": tuple(record["captions"])}
  for k in FIELDS:
    if k in record:
      out[k] = np.frombuffer(record[k], np.float16).reshape(shape).astype(np.float32)
  return out


def read_caption_metadata(directory: str) -> dict:
  meta = read_metadata(directory)
  if meta.get("format") != CAPTION_FORMAT:
    raise sources_lib.DatasetNotFoundError(
        f"{directory!r} is a latent cache without captions (format {meta.get('format', 1)!r}); "
        "write a caption cache with tools.cache_latents --input=... (and --text_encoder=...)")
  return meta


class CaptionLatentSource:
  """Random access to one split of a caption latent cache (module docstring)."""

  def __init__(self, directory: str, split: str):
    meta = read_caption_metadata(directory)
    info = meta.get("splits", {}).get(split)
    if not info or not info.get("complete"):
      raise sources_lib.DatasetNotFoundError(
          f"caption latent cache {directory!r} has no complete split {split!r}; run "
          f"tools.cache_latents with --split={split} (it resumes where it stopped)")
    import grain
    self.directory, self.split, self.meta = directory, split, meta
    self.shard_paths = [os.path.join(directory, s) for s in info["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
    self.latent_buckets = [tuple(b) for b in meta["latent_buckets"]]
    self.image_buckets = [tuple(b) for b in meta["image_buckets"]]
    self.text_info = info.get("text")
    self.description = f"caption latents {directory}/{split} ({len(self._source)} records)"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, i: int) -> dict:
    try:
      return decode_caption_record(self._source[i])
    except Exception as e:
      raise sources_lib.RecordError(f"cannot decode caption latent record {i} ({e})") from None

  def bucket_ids(self) -> np.ndarray:
    """int16 ``[len]``: every record's bucket, from the shards' side files (no record reads)."""
    ids = np.concatenate([np.load(p + BUCKETS_SUFFIX) for p in self.shard_paths])
    if len(ids) != len(self):
      raise sources_lib.DatasetNotFoundError(
          f"{self.description}: the bucket side files list {len(ids)} records, the shards hold "
          f"{len(self)}; re-run tools.cache_latents")
    return ids

  def text_table(self):
    """The split's ``text_cache.TextEmbeddingTable`` (``DatasetNotFoundError`` without one)."""
    from ascan_jax.data import text_cache
    if not self.text_info:
      raise sources_lib.DatasetNotFoundError(
          f"{self.description} has no text embeddings; re-run tools.cache_latents with "
          "--text_encoder=T5_DIR (latents already written are kept)")
    return text_cache.TextEmbeddingTable(self.directory, self.split, self.text_info)


def latent_affine(vae_config: dict) -> tuple[np.ndarray, np.ndarray, float]:
  """(mean, std, scale) of ``(z - mean) * scale / std`` from a VAE config dict (per-channel
  ``latents_mean``/``latents_std`` when present, else ``shift_factor``)."""
  if vae_config.get("latents_mean") is not None:
    return (np.asarray(vae_config["latents_mean"], np.float32),
            np.asarray(vae_config["latents_std"], np.float32), float(vae_config["scaling_factor"]))
  return (np.float32(vae_config.get("shift_factor") or 0.0), np.float32(1.0),
          float(vae_config["scaling_factor"]))


class CaptionLatentCodec:
  """Caption latent records -> ``latent``, ``text_embedding``, ``text_mask``, ``caption``."""

  def __init__(self, meta: dict, text_table, flip: bool = False):
    self.mean, self.std, self.scale = latent_affine(meta["vae_config"])
    self.latent_buckets = [tuple(b) for b in meta["latent_buckets"]]
    self.table = text_table
    self.flip = flip

  def _scaled(self, z: np.ndarray) -> np.ndarray:
    return ((z - self.mean) * (self.scale / self.std)).astype(np.float32)

  def _fields(self, latent: np.ndarray, caption: str) -> dict:
    embedding, mask = self.table.lookup(caption)
    return {"latent": latent, "text_embedding": embedding, "text_mask": mask,
            "caption": caption}

  def train(self, example: dict, rng: np.random.Generator) -> dict:
    captions = example["captions"]
    caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    flip = self.flip and "mean_flip" in example and rng.random() < 0.5
    mean = example["mean_flip" if flip else "mean"]
    std = example["std_flip" if flip else "std"]
    z = mean + std * rng.standard_normal(mean.shape, np.float32)
    return self._fields(self._scaled(z), caption)

  def eval(self, example: dict) -> dict:
    return self._fields(self._scaled(example["mean"]), example["captions"][0])

  def placeholder(self, bucket: int | None = None) -> dict:
    shape = self.latent_buckets[0 if bucket is None else int(bucket)]
    return {"latent": np.zeros(shape, np.float32),
            "text_embedding": np.zeros((self.table.max_length, self.table.dim), np.float32),
            "text_mask": np.zeros(self.table.max_length, np.int32), "caption": ""}
