"""Caption sets for caption-set FID: a jsonl file of ``{"caption": str, "image_id": str|int}``.

``read(path)`` checks every line (a line that is not a JSON object, or whose ``caption`` is not a
string or whose ``image_id`` is not a string or an integer, raises ``CaptionSetError`` naming the
file and the line). ``select(num_records, num, seed)`` and ``caption_choice(seed, record, n)``
are the draw of ``tools.make_caption_set`` (COCO-30K): ``num`` distinct records without
replacement, in record order, and one of each record's ``n`` captions, each a function of the
seed alone (and, for the caption, of the record's index), so the same seed gives the same file.
"""
from __future__ import annotations

import json

import numpy as np

from ascan_jax import fileio


class CaptionSetError(ValueError):
  """A caption file that is not one ``{"caption", "image_id"}`` object per line."""


def read(path: str) -> list[dict]:
  """``[{"caption", "image_id"}, ...]``, one per line of ``path`` (module docstring)."""
  if not fileio.exists(path):
    raise CaptionSetError(f"caption file {path} not found (tools.make_caption_set writes one)")
  rows = []
  for number, row in fileio.json_lines(path, CaptionSetError, skip_blank=False):
    for key in ("caption", "image_id"):
      if key not in row:
        raise CaptionSetError(f"{path}: line {number} misses key {key!r} (each line is "
                              '{"caption": str, "image_id": str or int})')
    if not isinstance(row["caption"], str):
      raise CaptionSetError(f"{path}: line {number}: key 'caption' is not a string")
    image_id = row["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
      raise CaptionSetError(f"{path}: line {number}: key 'image_id' is not a string or integer")
    rows.append({"caption": row["caption"], "image_id": image_id})
  if not rows:
    raise CaptionSetError(f"{path} holds no caption")
  return rows


def select(num_records: int, num: int, seed: int) -> np.ndarray:
  """``num`` distinct record indices of ``range(num_records)``, sorted, drawn with ``seed``."""
  if not 0 < num <= num_records:
    raise ValueError(f"cannot draw {num} records from a source of {num_records}")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_records, size=num, replace=False))


def caption_choice(seed: int, record: int, num_captions: int) -> int:
  """Which of record ``record``'s ``num_captions`` captions the set uses."""
  return int(np.random.default_rng([seed, int(record)]).integers(num_captions))


def write(path: str, rows: list[dict]) -> None:
  fileio.write_text(path, "".join(json.dumps({"caption": r["caption"],
                                              "image_id": r["image_id"]}) + "\n" for r in rows))
