"""Cached text-encoder embeddings, stored once per unique prompt, and their reader.

``tools.cache_latents --text_encoder=T5_DIR`` writes, per split, next to the latent shards:

* ``<split>-text-digests.npy``: uint64 ``[U, 2]``, the 128-bit BLAKE2b digests of the split's
  ``U`` unique prompts, sorted; a prompt's *id* is its row;
* ``<split>-text-KKKKK-of-NNNNN.array_record``: text record ``id`` (records in id order over the
  shards) is a msgpack map ``{prompt, length, dim, embedding}`` where ``embedding`` holds the
  encoder's output for the prompt's ``length`` real tokens (EOS included) as bfloat16 bytes,
  ``[length, dim]``.

Only the real tokens are kept: a consumer masks the padding (the T5 encoder and the UNet's
cross-attention both take the mask), so ``lookup`` returns ``embedding`` float32 ``[L, D]`` with
zeros past ``length`` and ``mask`` int32 ``[L]``; the rows a padded encoder batch would hold there
are the encoder's output for padding tokens, which a masked consumer never reads.

Why per unique prompt: a record of the latent cache lists its candidate prompts (ImageNet-as-T2I:
every synonym caption of its class; COCO: its five captions) and the codec draws one, so the
embeddings must be addressable by prompt, and templated sets repeat prompts massively (the
ImageNet proxy has about 1.9K prompts for 1.28M images). Size: Flan-T5-XXL gives 4096 x bf16 =
8 KiB per token; a 128-token padded embedding is 1 MiB, so one per caption at 10^8 captions is
about 105 TB, while trimmed to real tokens (web captions average a few tens of tokens) it is a
quarter of that or less, and de-duplicated the ImageNet proxy needs under 100 MB.

Lookup: digest the prompt, binary-search the (memory-mapped) digest table, read one record, and
check its stored prompt (a digest collision or a prompt missing from the cache raises ``KeyError``
naming the prompt). Picklable for grain workers (memory maps and readers reopen lazily).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import ml_dtypes
import msgpack
import numpy as np

from ascan_jax.data import sources as sources_lib

DIGESTS_SUFFIX = "-text-digests.npy"


def text_prefix(split: str) -> str:
  return f"{split}-text"


def digest(prompt: str) -> tuple[int, int]:
  """The prompt's 128-bit BLAKE2b digest as two uint64 (big-endian halves: sorting the pairs
  sorts the digests)."""
  d = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).digest()
  return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def sorted_unique_digests(prompts: Iterable[str]) -> np.ndarray:
  """uint64 ``[U, 2]``: the distinct digests of ``prompts``, sorted."""
  pairs = np.array([digest(p) for p in prompts], np.uint64).reshape(-1, 2)
  if not len(pairs):
    return pairs
  order = np.lexsort((pairs[:, 1], pairs[:, 0]))
  pairs = pairs[order]
  keep = np.ones(len(pairs), bool)
  keep[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
  return np.ascontiguousarray(pairs[keep])


def find(digests: np.ndarray, pair: tuple[int, int]) -> int:
  """The row of ``pair`` in sorted ``digests``, or -1."""
  hi, lo = np.uint64(pair[0]), np.uint64(pair[1])
  a = int(np.searchsorted(digests[:, 0], hi, side="left"))
  b = int(np.searchsorted(digests[:, 0], hi, side="right"))
  for row in range(a, b):
    if digests[row, 1] == lo:
      return row
  return -1


def encode_record(prompt: str, embedding: np.ndarray) -> bytes:
  """A text record: ``embedding`` ``[length, dim]`` (the prompt's real tokens) as bfloat16."""
  embedding = np.asarray(embedding)
  if embedding.ndim != 2:
    raise ValueError(f"a text embedding is [length, dim], got {embedding.shape}")
  return msgpack.packb({"prompt": prompt, "length": int(embedding.shape[0]),
                        "dim": int(embedding.shape[1]),
                        "embedding": embedding.astype(ml_dtypes.bfloat16).tobytes()},
                       use_bin_type=True)


def decode_record(data: bytes, max_length: int) -> tuple[str, np.ndarray, np.ndarray]:
  """``(prompt, embedding float32 [max_length, dim], mask int32 [max_length])``."""
  record = msgpack.unpackb(data, raw=False)
  n, dim = int(record["length"]), int(record["dim"])
  rows = np.frombuffer(record["embedding"], ml_dtypes.bfloat16).reshape(n, dim)
  embedding = np.zeros((max_length, dim), np.float32)
  embedding[:n] = rows[:max_length].astype(np.float32)
  mask = np.zeros(max_length, np.int32)
  mask[:n] = 1
  return record["prompt"], embedding, mask


class TextEmbeddingTable:
  """Random access to one split's prompt embeddings (module docstring)."""

  def __init__(self, directory: str, split: str, info: dict):
    self.directory, self.split = directory, split
    self.max_length, self.dim = int(info["max_length"]), int(info["dim"])
    self.digests_path = os.path.join(directory, info["digests"])
    self.shards = [os.path.join(directory, s) for s in info["shards"]]
    missing = [p for p in [self.digests_path] + self.shards if not os.path.exists(p)]
    if missing:
      raise sources_lib.DatasetNotFoundError(
          f"text cache of {directory!r}/{split} is incomplete: {missing[0]} is missing; re-run "
          "tools.cache_latents with --text_encoder (it resumes)")
    self.num_prompts = int(info["prompts"])
    self._digests = None
    self._source = None

  def __getstate__(self):
    return {**self.__dict__, "_digests": None, "_source": None}

  def __len__(self) -> int:
    return self.num_prompts

  def _open(self):
    if self._digests is None:
      self._digests = np.load(self.digests_path, mmap_mode="r")
      import grain
      self._source = grain.sources.ArrayRecordDataSource(self.shards)

  def id_of(self, prompt: str) -> int:
    self._open()
    row = find(self._digests, digest(prompt))
    if row < 0:
      raise KeyError(f"prompt {prompt!r} is not in the text cache of {self.directory}/"
                     f"{self.split}")
    return row

  def lookup(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """``(embedding float32 [L, D], mask int32 [L])`` of ``prompt``."""
    row = self.id_of(prompt)
    stored, embedding, mask = decode_record(self._source[row], self.max_length)
    if stored != prompt:
      raise KeyError(f"text cache digest collision: {prompt!r} and {stored!r}")
    return embedding, mask
