"""Whole-file writes for dataset tools, local or remote (``gs://`` through etils.epath).

A shard or a state file must appear complete or not at all, since tools resume by skipping the
files that exist. Locally a file is written under a temporary name and renamed. ArrayRecord
writes only to local paths, so a remote shard is written to a local temporary file and then
uploaded; an object store shows an object only once its upload completes, so the same rule holds.
Temporary names end in ``.tmp-<tag>`` (``tag`` names the writer, so writers on other processes
never touch each other's files; ``remove_stale_temporaries`` cleans up after killed ones).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable

from etils import epath

TMP_MARK = ".tmp-"
UNCOMPRESSED = "group_size:1,uncompressed"


def is_remote(path: str) -> bool:
  return "://" in str(path)


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:])) if is_remote(parts[0]) else \
      os.path.join(*parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def shard_name(prefix: str, k: int, n: int, suffix: str = ".array_record") -> str:
  return f"{prefix}-{k:05d}-of-{n:05d}{suffix}"


def write_bytes(path: str, data: bytes, tag: str = "0") -> None:
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}{TMP_MARK}{tag}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, value, tag: str = "0") -> None:
  write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), tag)


def read_json(path: str):
  return json.loads(epath.Path(path).read_text())


def write_records(path: str, records: Iterable[bytes], tag: str = "0",
                  before_publish: Callable[[], None] | None = None,
                  options: str = "group_size:1") -> int:
  """Writes an ArrayRecord file of ``records`` (streamed); returns how many were written.
  ``options``: ArrayRecord writer options (``UNCOMPRESSED`` suits payloads that are already
  compressed or noise-like: encoded images, latents, embeddings; it reads about twice as fast).
  ``before_publish`` runs once every record is written, before the file appears under ``path``
  (side files written there exist whenever the shard does)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  if is_remote(path):
    fd, tmp = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
  else:
    tmp = f"{path}{TMP_MARK}{tag}"
  writer = ArrayRecordWriter(tmp, options)
  n = 0
  try:
    for record in records:
      writer.write(record)
      n += 1
  finally:
    writer.close()
  if before_publish is not None:
    before_publish()
  if is_remote(path):
    epath.Path(tmp).copy(epath.Path(path), overwrite=True)
    os.remove(tmp)
  else:
    os.replace(tmp, path)
  return n


def remove_stale_temporaries(directory: str) -> list[str]:
  """Deletes the temporary files writers killed mid-write left in ``directory`` (local only:
  remote writes leave none)."""
  if is_remote(directory) or not os.path.isdir(directory):
    return []
  stale = [os.path.join(directory, n) for n in os.listdir(directory) if TMP_MARK in n]
  for path in stale:
    os.remove(path)
  return stale
