"""Start-up checks of a run's config: unknown keys, wrong types, impossible generic values.

``check_keys_and_types(config, schema)`` and ``check_values(config, ...)`` raise ``ConfigError``
with one message naming the offending key, before the run writes anything. The schema is the
task's (``Task.default_config()`` plus its evaluator types, ``tasks.base.schema_for``); values
that only one task understands are checked by that task's ``Task.validate``. The checks that need
the device count (a batch that does not divide over the data-parallel devices) take it as
arguments. This module imports no JAX and nothing above the config layer.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable

import ml_collections

_MODES = ("train", "eval", "summary", "bench", "sample", "geneval")
_SCHEDULES = ("cosine", "constant", "linear", "poly")


class ConfigError(ValueError):
  """A config that cannot run; the message names the key."""


def _walk(cfg: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for key in cfg.keys():
    value = cfg[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield path, value
      yield from _walk(value, path + ".")
    else:
      yield path, value


def _lookup(cfg: ml_collections.ConfigDict, path: str):
  node = cfg
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise KeyError(path)
    node = node[part]
  return node


def _type_ok(value: Any, ref: Any) -> bool:
  if ref is None or value is None:
    return True
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(ref, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, int):
    return isinstance(value, int)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(ref, ml_collections.ConfigDict):
    return isinstance(value, ml_collections.ConfigDict)
  return isinstance(value, type(ref))


def check_keys_and_types(config: ml_collections.ConfigDict,
                         schema: ml_collections.ConfigDict) -> None:
  """Unknown keys (with a 'did you mean') and values whose type differs from the schema."""
  task = config.get("task", "")
  known = dict(_walk(schema))
  for path, value in _walk(config):
    if path not in known:
      parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
      siblings = [k[len(parent):] for k in known
                  if k.startswith(parent) and "." not in k[len(parent):]]
      close = difflib.get_close_matches(path[len(parent):], siblings, n=1, cutoff=0.7)
      hint = f"; did you mean 'config.{parent}{close[0]}'?" if close else ""
      raise ConfigError(f"unknown config key 'config.{path}' for task {task!r}{hint}")
    ref = known[path]
    if not _type_ok(value, ref):
      raise ConfigError(f"config.{path} = {value!r} has type {type(value).__name__}, "
                        f"expected {type(ref).__name__} (like the default {ref!r})")


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


require = _require  # for tasks' own checks (Task.validate).

DTYPES = ("auto", "float32", "bfloat16")
ATTENTION = ("auto", "xla", "cudnn", "pallas")
REMAT = ("none", "full", "dots", "dots_no_batch")


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  """``config.<key>`` must be one of ``choices``."""
  value = config
  for part in key.split("."):
    value = value[part]
  _require(value in choices, key, f"{value!r} is not one of {tuple(choices)}")


def check_model_common(config: ml_collections.ConfigDict) -> None:
  """The compute dtype, attention implementation and remat policy of ``config.model``."""
  check_choice(config, "model.dtype", DTYPES)
  check_choice(config, "model.attention_impl", ATTENTION)
  check_choice(config, "model.remat_policy", REMAT)
  _require(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """The mesh shape with its -1 resolved; raises if it cannot cover ``num_devices``."""
  shape = tuple(int(s) for s in config.mesh.shape)
  axes = tuple(config.mesh.axes)
  _require(len(shape) == len(axes), "mesh.shape",
           f"{shape} has {len(shape)} entries but mesh.axes {axes} has {len(axes)}")
  _require(shape.count(-1) <= 1, "mesh.shape", f"{shape}: at most one axis may be -1")
  _require(all(s == -1 or s >= 1 for s in shape), "mesh.shape",
           f"{shape}: sizes must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    _require(num_devices % known == 0, "mesh.shape",
             f"{shape}: the fixed axes ({known} devices) do not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  _require(math.prod(shape) == num_devices, "mesh.shape",
           f"{shape} covers {math.prod(shape)} devices but {num_devices} are present")
  return shape


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways the batch is split: the product of the mesh axes 'batch' maps to."""
  shape = dict(zip(config.mesh.axes, mesh_shape(config, num_devices)))
  for logical, axes in config.mesh.rules:
    if logical == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return math.prod(shape[a] for a in axes if a in shape)
  return 1


def check_values(config: ml_collections.ConfigDict, *, num_devices: int = 1,
                 num_processes: int = 1, mode: str = "train") -> None:
  """Generic values that cannot work: durations, batch divisibility, mesh, optimizer, runs."""
  _require(mode in _MODES, "mode", f"{mode!r} is not one of {_MODES}")
  _require(config.batch_size > 0, "batch_size", f"must be positive, got {config.batch_size}")
  _require(config.eval_batch_size > 0, "eval_batch_size", "must be positive")
  _require(config.total_steps > 0 or config.total_epochs > 0, "total_steps",
           "set total_steps > 0 or total_epochs > 0")
  _require(config.microbatches >= 1, "microbatches", "must be >= 1")
  _require(config.batch_size % config.microbatches == 0, "microbatches",
           f"{config.microbatches} does not divide batch_size {config.batch_size}")
  dp = data_parallel_size(config, num_devices)
  micro = config.batch_size // config.microbatches
  _require(micro % dp == 0, "batch_size",
           f"{config.batch_size} (micro-batch {micro}) does not divide over the {dp} "
           f"data-parallel devices of mesh {tuple(config.mesh.shape)}")
  _require(config.batch_size % num_processes == 0, "batch_size",
           f"{config.batch_size} does not divide over {num_processes} processes")
  _require(config.eval_batch_size % dp == 0, "eval_batch_size",
           f"{config.eval_batch_size} does not divide over the {dp} data-parallel devices")
  mesh_axes = set(config.mesh.axes)
  for logical, axes in config.mesh.rules:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for a in axes:
      _require(a in mesh_axes, "mesh.rules",
               f"rule ({logical!r}, {axes}) names mesh axis {a!r}, not in mesh.axes")
  o = config.optim
  _require(o.peak_lr > 0, "optim.peak_lr", "must be positive")
  _require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
  _require(o.name == "adamw", "optim.name", f"{o.name!r} is not supported (adamw)")
  _require(config.log.every_steps > 0, "log.every_steps", "must be positive")
  _require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
  _require(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  _check_optim_and_runs(config)


def _check_optim_and_runs(config: ml_collections.ConfigDict) -> None:
  o = config.optim
  _require(o.schedule in _SCHEDULES, "optim.schedule",
           f"{o.schedule!r} is not one of {_SCHEDULES}")
  _require(o.poly_power > 0, "optim.poly_power", "must be positive")
  _require(0.0 < o.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1]")
  for i, group in enumerate(o.groups):
    _require(isinstance(group, (tuple, list)) and len(group) == 3, "optim.groups",
             f"entry {i} {group!r} is not (regex, lr_multiplier, weight_decay_multiplier)")
    try:
      re.compile(group[0])
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.optim.groups: entry {i} regex {group[0]!r}: {e}") from None
    _require(all(isinstance(m, (int, float)) and m >= 0 for m in group[1:]), "optim.groups",
             f"entry {i}: multipliers must be numbers >= 0, got {group[1:]}")
  c = config.checkpoint
  _require(c.best_mode in ("", "max", "min"), "checkpoint.best_mode",
           f"{c.best_mode!r} is not 'max' or 'min'")
  for name in config.evals.keys():
    e = config.evals[name]
    _require(e.every_steps > 0, f"evals.{name}.every_steps", "must be positive")
    if "params" in e:
      _require(e.params in ("raw", "ema", "both"), f"evals.{name}.params",
               f"{e.params!r} is not raw, ema or both")
  i = config.init_from
  _require(i.which in ("ema", "raw"), "init_from.which", f"{i.which!r} is not 'ema' or 'raw'")
  for key in ("include", "exclude"):
    try:
      re.compile(i[key])
    except re.error as e:
      raise ConfigError(f"config.init_from.{key}: bad regex {i[key]!r}: {e}") from None
  for j, pair in enumerate(i.rename):
    _require(isinstance(pair, (tuple, list)) and len(pair) == 2, "init_from.rename",
             f"entry {j} {pair!r} is not (regex, replacement)")


def validate(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
             **kwargs) -> None:
  """The generic checks; raises ConfigError with one message naming the key."""
  check_keys_and_types(config, schema)
  check_values(config, **kwargs)
