"""Text files of a run's workdir, local or remote (``gs://`` through etils.epath and gcsfs).

Object stores have no append, so ``append_line`` rewrites a remote file whole (run files are
small: metrics.jsonl of a 300-epoch run is about a megabyte); locally it appends. Local writes of
whole files go through a temporary file and a rename, so a crash never leaves half a file.
"""
from __future__ import annotations

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
