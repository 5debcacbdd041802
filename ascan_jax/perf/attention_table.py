"""Measured attention-implementation choices, read by ``attention_impl=auto``.

``attention_choices.json`` (next to this module) holds ``{"entries": [...]}``; each entry says
which implementation was fastest on one kind of device for one dtype, head dim and range of
sequence lengths::

  {"platform": "gpu", "device_kind": "NVIDIA H200", "dtype": "bfloat16", "head_dim": 32,
   "seq_len_min": 0, "seq_len_max": 442, "choice": "xla", "measured_seq_len": 196,
   "ms": {"xla": 0.21, "cudnn": 0.35}, "source": "results/accelerator/h200/report.json"}

``seq_len_max`` null means no upper bound; ``device_kind`` is compared with JAX's
``device.device_kind`` ignoring case; ``ms`` and ``source`` are documentation. The accelerator
report (``python -m ascan_jax.tools.accelerator_report``) measures every implementation on an
accelerator and writes entries in this format to ``DIR/attention_choices.json``; copy them here
to make ``auto`` use them. A device, dtype, head dim or length with no entry keeps the rules of
thumb in ``ascan_jax.models.attention.resolve_implementation``.
"""
from __future__ import annotations

import functools
import json
import math
import os

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_choices.json")
CHOICES = ("xla", "cudnn", "pallas")
REQUIRED = ("platform", "device_kind", "dtype", "head_dim", "seq_len_min", "seq_len_max",
            "choice")


class AttentionTableError(ValueError):
  """A malformed table file; the message names the file, the entry and the key."""


def check_entries(entries, path: str = "<table>") -> tuple[dict, ...]:
  """The entries, validated (see the module docstring for the format)."""
  if not isinstance(entries, list):
    raise AttentionTableError(f"{path}: 'entries' must be a list, got {type(entries).__name__}")
  for i, e in enumerate(entries):
    where = f"{path}: entry {i}"
    if not isinstance(e, dict):
      raise AttentionTableError(f"{where} is not an object")
    missing = [k for k in REQUIRED if k not in e]
    if missing:
      raise AttentionTableError(f"{where} lacks {missing}")
    if e["choice"] not in CHOICES:
      raise AttentionTableError(f"{where}: choice {e['choice']!r} is not one of {CHOICES}")
    low, high = e["seq_len_min"], e["seq_len_max"]
    if not isinstance(low, int) or (high is not None and (not isinstance(high, int) or
                                                          high < low)):
      raise AttentionTableError(f"{where}: seq_len_min {low!r} / seq_len_max {high!r} are not a "
                                "range of integers (max null = unbounded)")
    if not isinstance(e["head_dim"], int) or e["head_dim"] < 1:
      raise AttentionTableError(f"{where}: head_dim {e['head_dim']!r} is not a positive integer")
  return tuple(entries)


@functools.lru_cache(maxsize=8)
def load(path: str = TABLE_PATH) -> tuple[dict, ...]:
  """The validated entries of a table file (cached per path)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    return ()
  except json.JSONDecodeError as e:
    raise AttentionTableError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or "entries" not in data:
    raise AttentionTableError(f"{path}: expected an object with an 'entries' list")
  return check_entries(data["entries"], path)


def choose(entries, *, platform: str, device_kind: str | None, dtype: str, seq_len: int,
           head_dim: int) -> str | None:
  """The recorded choice for this case, or None when no entry covers it."""
  if not device_kind:
    return None
  kind = device_kind.lower()
  for e in entries:
    if (e["platform"] == platform and e["device_kind"].lower() == kind and e["dtype"] == dtype
        and e["head_dim"] == head_dim and seq_len >= e["seq_len_min"]
        and (e["seq_len_max"] is None or seq_len <= e["seq_len_max"])):
      return e["choice"]
  return None


def entries_from_sweep(results: list[dict], platform: str, device_kind: str,
                       dtype: str) -> list[dict]:
  """Table entries (``perf/attention_choices.json``'s format) from sweep results: per head dim,
  sequence lengths sorted, each result covers lengths up to the geometric mean with the next."""
  entries = []
  for head_dim in sorted({r["head_dim"] for r in results}):
    rs = sorted((r for r in results if r["head_dim"] == head_dim), key=lambda r: r["seq_len"])
    for i, r in enumerate(rs):
      low = 0 if i == 0 else math.isqrt(rs[i - 1]["seq_len"] * r["seq_len"]) + 1
      high = None if i == len(rs) - 1 else math.isqrt(r["seq_len"] * rs[i + 1]["seq_len"])
      entries.append({"platform": platform, "device_kind": device_kind, "dtype": dtype,
                      "head_dim": head_dim, "seq_len_min": low, "seq_len_max": high,
                      "choice": r["choice"], "measured_seq_len": r["seq_len"],
                      "ms": {k: round(v, 4) for k, v in r["ms_no_bias_plus_bias"].items()}})
  return entries
