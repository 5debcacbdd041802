"""Cached VAE latents: the ArrayRecord format ``tools.cache_latents`` writes, and its reader.

A cache folder holds ``metadata.json`` and ``<split>-NNNNN-of-NNNNN.array_record`` shards. Each
record is a msgpack map with the posterior ``mean`` and ``std`` of the image and of its horizontal
flip (float16 bytes, ``[h, w, c]``), the ``label`` and the source ``index``. Keeping mean and std
(not one sample) lets every epoch draw a fresh latent; keeping the flip lets training flip
without decoding. Metadata records the VAE (path, config, weights hash) and the latent shape.

``LatentCodec`` turns a record into ``{'latent': float32 [h, w, c], 'label'}``: in training a
random flip and ``z = mean + std * noise`` (numpy generator seeded by the pipeline), in
evaluation the un-flipped mean; both scaled by the VAE's scaling/shift factors (the "model
latents" a diffusion model is trained on).
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
