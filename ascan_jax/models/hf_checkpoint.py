"""Hugging Face model directories without torch: ``config.json`` and safetensors, read lazily.

A Hugging Face (transformers or diffusers) model directory holds ``config.json`` and its weights
as one ``*.safetensors`` file or as shards listed by ``*.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). ``SafetensorsCheckpoint(DIR)`` indexes every
tensor's file, dtype, shape and byte range from the headers alone (nothing else is read), and
memory-maps the data: ``get(name)`` returns one tensor, ``get_slice(name, index)`` only the part
an index selects. bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.

``load_arrays(checkpoint, targets)`` builds ``jax.Array``s directly in their target shardings with
``jax.make_array_from_callback``: each device's callback reads only that device's slice from the
memory map, so a 4.7B-parameter encoder is never whole in one host's memory or on one device
(each host reads the shards its own devices hold). A target may transpose the stored layout
(torch ``[out, in]`` linear weights become flax ``[in, out]`` kernels). Every missing,
unexpected and mis-shaped tensor is collected and reported in one ``WeightsMismatchError``
that names them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

CONFIG_NAME = "config.json"
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


class WeightsMismatchError(ValueError):
  """Weights that do not fit the model: the message lists every tensor that differs."""


def _np_dtype(code: str, file: str, name: str):
  if code not in _DTYPES:
    raise ValueError(f"{file}: tensor {name} has unsupported dtype {code}")
  if code == "BF16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(_DTYPES[code])


def read_config(directory: str) -> dict:
  """The directory's ``config.json`` as a dict (a clear error when it is missing)."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model directory {directory!r} does not exist")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} is not a Hugging Face model directory: no "
                            f"{CONFIG_NAME}")
  with open(path) as f:
    return json.load(f)


def weight_files(directory: str, weights_name: str | None = None) -> list[str]:
  """The safetensors files of a model directory (one file, or the shards of an index)."""
  if weights_name:
    candidates = [weights_name]
  else:
    names = sorted(os.listdir(directory))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    singles = [n for n in names if n.endswith(".safetensors")]
    candidates = indexes[:1] or [n for n in singles if not n.endswith(".index.json")]
    if len(candidates) > 1 and not indexes:
      preferred = [n for n in candidates if n in ("model.safetensors",
                                                 "diffusion_pytorch_model.safetensors")]
      candidates = preferred[:1] or candidates
  if not candidates:
    present = sorted(f for f in os.listdir(directory)
                     if f.endswith((".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")))
    raise FileNotFoundError(f"no *.safetensors weights in {directory!r}"
                            + (f" (found {present}; convert them to safetensors)"
                               if present else ""))
  path = os.path.join(directory, candidates[0])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path} not found")
  if path.endswith(".index.json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise FileNotFoundError(f"{path} lists shard(s) that are missing: {missing}")
    return [os.path.join(directory, f) for f in files]
  return [path]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # byte offset of the data in the file.
  end: int


def _read_header(file: str) -> tuple[dict, int]:
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{file} is not a safetensors file (shorter than its header length)")
    n = int.from_bytes(raw, "little")
    if n <= 0 or n > os.path.getsize(file) - 8:
      raise ValueError(f"{file} is not a safetensors file (bad header length {n})")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not a safetensors file ({e})") from None
  return header, 8 + n


class SafetensorsCheckpoint:
  """Lazy, name-addressed access to every tensor of a model directory or a file list."""

  def __init__(self, directory_or_files: str | Sequence[str], weights_name: str | None = None):
    if isinstance(directory_or_files, str):
      if os.path.isfile(directory_or_files):
        files = [directory_or_files]
      else:
        files = weight_files(directory_or_files, weights_name)
      self.source = directory_or_files
    else:
      files = list(directory_or_files)
      self.source = ", ".join(files)
    self.files = files
    self.info: dict[str, TensorInfo] = {}
    self._maps: dict[str, np.memmap] = {}
    for file in files:
      header, data_start = _read_header(file)
      for name, entry in header.items():
        if name == "__metadata__":
          continue
        begin, end = entry["data_offsets"]
        self.info[name] = TensorInfo(file, _np_dtype(entry["dtype"], file, name),
                                     tuple(int(d) for d in entry["shape"]),
                                     data_start + begin, data_start + end)

  def names(self) -> list[str]:
    return sorted(self.info)

  def __contains__(self, name: str) -> bool:
    return name in self.info

  def shape(self, name: str) -> tuple[int, ...]:
    return self.info[name].shape

  def _array(self, name: str) -> np.ndarray:
    t = self.info[name]
    if t.file not in self._maps:
      self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
    count = int(np.prod(t.shape, dtype=np.int64))
    raw = self._maps[t.file][t.begin:t.end]
    return raw.view(t.dtype)[:count].reshape(t.shape)

  def get(self, name: str) -> np.ndarray:
    """The whole tensor (a copy in host memory)."""
    return np.array(self._array(name))

  def get_slice(self, name: str, index) -> np.ndarray:
    """``tensor[index]``, reading only the bytes the index touches."""
    return np.array(self._array(name)[index])


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one model parameter comes from: tensor ``name`` of the checkpoint, stored in the
  model's layout after ``transpose`` (a permutation of the stored axes, or None)."""
  name: str
  shape: tuple[int, ...]  # in the model's layout.
  dtype: Any = np.float32
  sharding: Any = None  # a jax.sharding.Sharding; None: the default device.
  transpose: tuple[int, ...] | None = None


def _stored_shape(t: Target) -> tuple[int, ...]:
  if t.transpose is None:
    return tuple(t.shape)
  stored = [0] * len(t.shape)
  for model_axis, stored_axis in enumerate(t.transpose):
    stored[stored_axis] = t.shape[model_axis]
  return tuple(stored)


def check_targets(checkpoint: SafetensorsCheckpoint, targets: Mapping[Any, Target],
                  *, what: str, ignore_unexpected: Callable[[str], bool] | None = None) -> None:
  """Raises ``WeightsMismatchError`` listing missing, unexpected and mis-shaped tensors."""
  wanted = {t.name for t in targets.values()}
  missing = sorted(f"{t.name} {_stored_shape(t)}" for t in targets.values()
                   if t.name not in checkpoint)
  wrong = sorted(f"{t.name}: expected {_stored_shape(t)}, found {checkpoint.shape(t.name)}"
                 for t in targets.values()
                 if t.name in checkpoint and checkpoint.shape(t.name) != _stored_shape(t))
  unexpected = sorted(f"{n} {checkpoint.shape(n)}" for n in checkpoint.names()
                      if n not in wanted and not (ignore_unexpected and ignore_unexpected(n)))
  if missing or unexpected or wrong:
    lines = [f"weights in {checkpoint.source} do not match {what} (shapes in the file's "
             "layout):"]
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("tensors with the wrong shape", wrong)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines.extend(f"  {item}" for item in items)
    raise WeightsMismatchError("\n".join(lines))


def load_arrays(checkpoint: SafetensorsCheckpoint, targets: Mapping[Any, Target], *,
                what: str = "the model",
                ignore_unexpected: Callable[[str], bool] | None = None) -> dict:
  """``{key: jax.Array}`` for every target, each created in its sharding from the slices its
  devices hold (see the module docstring). Checks every name and shape first."""
  import jax  # pylint: disable=g-import-not-at-top
  check_targets(checkpoint, targets, what=what, ignore_unexpected=ignore_unexpected)
  out = {}
  for key, t in targets.items():
    sharding = t.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(index, t=t):
      index = tuple(index) + (slice(None),) * (len(t.shape) - len(tuple(index)))
      if t.transpose is None:
        part = checkpoint.get_slice(t.name, index)
      else:
        stored_index = [slice(None)] * len(t.shape)
        for model_axis, stored_axis in enumerate(t.transpose):
          stored_index[stored_axis] = index[model_axis]
        part = np.transpose(checkpoint.get_slice(t.name, tuple(stored_index)), t.transpose)
      return np.asarray(part).astype(t.dtype)

    out[key] = jax.make_array_from_callback(tuple(t.shape), sharding, read)
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """``{('a', 'b'): x}`` -> ``{'a': {'b': x}}``."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def _contiguous(x) -> np.ndarray:
  """C-contiguous without promoting a 0-d array to 1-d (``np.ascontiguousarray`` would)."""
  return np.require(np.asarray(x), requirements="C")


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], *,
                     max_shard_bytes: int | None = None,
                     metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes ``tensors`` as ``path`` (one file) or, with ``max_shard_bytes``, as Hugging Face
  shards ``<stem>-0000i-of-0000n.safetensors`` plus ``<path>.index.json``. Returns the files.
  (Used by tools and tests that make model directories; bfloat16 is written as BF16.)"""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  meta = dict(metadata or {"format": "pt"})
  names = sorted(tensors)
  if not max_shard_bytes:
    safetensors.numpy.save_file({n: _contiguous(tensors[n]) for n in names}, path,
                                metadata=meta)
    return [path]
  shards, current, size = [], [], 0
  for n in names:
    nbytes = np.asarray(tensors[n]).nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(n)
    size += nbytes
  if current:
    shards.append(current)
  directory = os.path.dirname(path) or "."
  stem = os.path.basename(path)[:-len(".safetensors")]
  files, weight_map = [], {}
  for i, group in enumerate(shards):
    fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file({n: _contiguous(tensors[n]) for n in group},
                                os.path.join(directory, fname), metadata=meta)
    files.append(os.path.join(directory, fname))
    weight_map.update({n: fname for n in group})
  total = int(sum(np.asarray(t).nbytes for t in tensors.values()))
  with open(path + ".index.json", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files
