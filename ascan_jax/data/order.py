"""The data order: which record sits at global position ``g`` of a run's stream.

Position ``g`` belongs to epoch ``g // N`` (``N`` records) and reads record
``shuffle(epoch)(g % N)``, a permutation drawn from ``(seed, epoch)``. So the record at ``g`` is a
pure function of ``(seed, g)``: a resumed run, or one on another number of processes or workers,
reads exactly the same records, and each worker computes its own positions independently.

``index_shuffle`` (the default) is grain's stateless Feistel-network permutation
(``grain.experimental.index_shuffle``): random access in O(1) time and memory, so it scales to
10^9 records (a materialised permutation of 10^9 int64 would be 8 GB per worker and epoch).
``permutation`` is the materialised ``numpy`` permutation earlier versions used; it is kept so
that runs made before the switch can be reproduced exactly (``data.shuffle=permutation``), and
costs ``8 N`` bytes per worker.
"""
from __future__ import annotations

import functools

import numpy as np

SHUFFLES = ("index_shuffle", "permutation")
FEISTEL_ROUNDS = 4


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed per (run seed, epoch), well mixed (grain's shuffle takes uint32 seeds)."""
  return int(np.random.SeedSequence([int(seed), int(epoch), 7919]).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def record_at(position: int, num_records: int, seed: int,
              shuffle: str = "index_shuffle") -> int:
  """The record read at global stream position ``position`` (see the module docstring)."""
  if num_records <= 0:
    raise ValueError("the data source has no records")
  epoch, offset = divmod(int(position), int(num_records))
  if shuffle == "index_shuffle":
    from grain.experimental import index_shuffle  # pylint: disable=g-import-not-at-top
    return int(index_shuffle(offset, max_index=int(num_records) - 1,
                             seed=_epoch_seed(seed, epoch), rounds=FEISTEL_ROUNDS))
  if shuffle == "permutation":
    return int(_epoch_permutation(int(seed), epoch, int(num_records))[offset])
  raise ValueError(f"data.shuffle {shuffle!r} is not one of {SHUFFLES}")
