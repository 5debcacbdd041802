"""Text files of a run's workdir, local or remote (``gs://`` through etils.epath and gcsfs).

Object stores have no append, so ``append_line`` rewrites a remote file whole (run files are
small: metrics.jsonl of a 300-epoch run is about a megabyte); locally it appends. Local writes of
whole files go through a temporary file and a rename, so a crash never leaves half a file.
``json_lines`` reads a JSON-lines file whose every line must be an object, naming the file and
the line of the first that is not.
"""
from __future__ import annotations

import json
import os

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in str(path)


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:])) if is_remote(parts[0]) else \
      os.path.join(*parts)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def json_lines(path: str, error=ValueError, *, skip_blank: bool = True):
  """``(line number, dict)`` per line of a JSON-lines file; a line that is not UTF-8 JSON or
  not an object raises ``error`` naming ``path`` and the line. Blank lines are skipped, or with
  ``skip_blank=False`` refused (files whose line number means something)."""
  with epath.Path(path).open("rb") as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        if skip_blank:
          continue
        raise error(f"{path}: line {number} is empty (one JSON object a line)")
      try:
        row = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: line {number} is not UTF-8 JSON ({e})") from None
      if not isinstance(row, dict):
        raise error(f"{path}: line {number} is not a JSON object")
      yield number, row


def write_text(path: str, text: str) -> None:
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def append_line(path: str, line: str) -> None:
  line = line.rstrip("\n") + "\n"
  if is_remote(path):
    old = read_text(path) if exists(path) else ""
    epath.Path(path).write_text(old + line)
    return
  with open(path, "a") as f:
    f.write(line)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file (through a temporary file and a rename when local)."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def rename(src: str, dst: str) -> None:
  """Moves a file or a directory (a copy and a delete on object stores)."""
  epath.Path(src).rename(dst)


class WorkdirError(ValueError):
  """A --workdir that cannot be used; the message says why."""


def check_workdir(path: str, *, must_exist: bool = False) -> None:
  """Raises ``WorkdirError`` when ``path`` cannot serve as a run directory: a file, a directory
  that cannot be created or written, or (``must_exist``) no directory at all. Writes nothing
  that stays: a probe file is created and removed. Remote paths (gs://) are not probed."""
  if not path:
    raise WorkdirError("--workdir is empty")
  if is_remote(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={path} is a file, not a directory")
  created = []
  if not os.path.exists(path):
    if must_exist:
      raise WorkdirError(f"--workdir={path} does not exist (no run there to use)")
    missing = os.path.abspath(path)
    while not os.path.exists(missing):
      created.append(missing)
      missing = os.path.dirname(missing)
    try:
      os.makedirs(path)
    except OSError as e:
      raise WorkdirError(f"--workdir={path} cannot be created ({e.strerror or e})") from None
  try:
    probe = os.path.join(path, f".ascan_write_probe_{os.getpid()}")
    try:
      with open(probe, "w") as f:
        f.write("")
      os.remove(probe)
    except OSError as e:
      raise WorkdirError(f"--workdir={path} cannot be written ({e.strerror or e})") from None
  finally:
    for d in created:  # leave nothing behind: the run creates what it needs itself.
      try:
        os.rmdir(d)
      except OSError:
        break
