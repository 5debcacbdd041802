"""Counts the collectives of an optimised (post-SPMD-partitioning) HLO module, for layout tests.

``collectives(compiled.as_text())`` -> ``{kind: Collective(count, bytes)}`` for the five kinds
XLA's SPMD partitioner emits: all-gather, all-reduce, reduce-scatter, collective-permute and
all-to-all (an async ``-start``/``-done`` pair counts once, at its start). ``bytes`` is the size of
each collective's result on one device, summed: the gathered array for an all-gather, the reduced
array for an all-reduce, the shard for a reduce-scatter. Pure Python (no JAX), so the measuring
script in ``results/collectives`` can use it on any checkout.
"""
from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# "%name = TYPE kind(" or "%name = TYPE kind-start(", TYPE an array type or a tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+(" + "|".join(KINDS)
                          + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: int = 0


def type_bytes(hlo_type: str) -> int:
  """Bytes of an HLO result type such as ``f32[8,16]{1,0}`` or ``(f32[16]{0}, s32[])``."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype not in DTYPE_BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in {hlo_type!r}")
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo_text: str) -> dict[str, Collective]:
  """``{kind: Collective(count, bytes)}`` of every kind in ``KINDS`` (zero when absent)."""
  out = {kind: Collective() for kind in KINDS}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      out[m.group(2)].count += 1
      out[m.group(2)].bytes += type_bytes(m.group(1))
  return out
