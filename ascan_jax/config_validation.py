"""Start-up checks of a run's config: unknown keys, wrong types, impossible values.

``validate(config)`` raises ``ConfigError`` with one message naming the offending key, before the
run writes anything. The schema is ``config_defaults.<task>()``; the value checks that need the
device count (a batch that does not divide over the data-parallel devices) take it as arguments.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import ml_collections

from ascan_jax import config_defaults

_DTYPES = ("auto", "float32", "bfloat16")
_ATTENTION = ("auto", "xla", "cudnn", "pallas")
_REMAT = ("none", "full", "dots", "dots_no_batch")
_MODES = ("train", "eval", "summary", "bench", "sample")


class ConfigError(ValueError):
  """A config that cannot run; the message names the key."""


def schema_for(task: str) -> ml_collections.ConfigDict:
  if task not in config_defaults.TASKS:
    raise ConfigError(f"config.task={task!r} is not a known task; choose one of "
                      f"{sorted(config_defaults.TASKS)}")
  return config_defaults.TASKS[task]()


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


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Unknown keys (with a 'did you mean') and values whose type differs from the schema."""
  task = config.get("task", "")
  schema = schema_for(task)
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
  """Values that cannot work: shapes, divisibility, names of implementations and policies."""
  from ascan_jax.models import layout as layout_lib  # jax-free module.

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
  _require(config.eval.every_steps > 0, "eval.every_steps", "must be positive")
  if "model" in config and "layout" in config.model:
    m = config.model
    try:
      layout_lib.parse_layout(m.layout, num_stages=len(m.widths))
    except layout_lib.LayoutError as e:
      raise ConfigError(f"config.model.layout: {e}") from None
    _require(m.dtype in _DTYPES, "model.dtype", f"{m.dtype!r} is not one of {_DTYPES}")
    _require(m.attention_impl in _ATTENTION, "model.attention_impl",
             f"{m.attention_impl!r} is not one of {_ATTENTION}")
    _require(m.remat_policy in _REMAT, "model.remat_policy",
             f"{m.remat_policy!r} is not one of {_REMAT}")
    stages = layout_lib.parse_layout(m.layout)
    for i, (stage, width) in enumerate(zip(stages, m.widths)):
      if "T" in stage:
        _require(width % m.head_dim == 0, "model.widths",
                 f"stage {i + 1} has T blocks and width {width}, not a multiple of head_dim "
                 f"{m.head_dim}")
    _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
  if config.task == "diffusion":
    check_diffusion(config)
  if "data" in config and "image_size" in config.data:
    _require(config.data.image_size >= 16, "data.image_size", "must be at least 16")
    _require(config.data.num_classes >= 2, "data.num_classes", "must be at least 2")
    _require(config.data.worker_count >= 0, "data.worker_count", "must be >= 0")
    _require(0.0 < config.data.holdout_fraction < 1.0, "data.holdout_fraction",
             "must be in (0, 1)")


def check_diffusion(config: ml_collections.ConfigDict) -> None:
  """Values of the diffusion task that cannot work."""
  from ascan_jax.diffusion import generate, samplers  # imports jax; called after start-up.
  from ascan_jax.models import layout as layout_lib
  m, s, d, e = config.model, config.sample, config.diffusion, config.eval
  _require(s.sampler in samplers.SAMPLERS, "sample.sampler",
           f"{s.sampler!r} is not one of {sorted(samplers.SAMPLERS)}")
  _require(s.guidance in generate.GUIDANCE_KINDS, "sample.guidance",
           f"{s.guidance!r} is not one of {generate.GUIDANCE_KINDS}")
  _require(s.steps >= 1, "sample.steps", "must be >= 1")
  _require(s.per_class >= 1, "sample.per_class", "must be >= 1")
  _require(0.0 < d.beta_start < d.beta_end < 1.0, "diffusion.beta_end",
           f"need 0 < beta_start ({d.beta_start}) < beta_end ({d.beta_end}) < 1")
  _require(0.0 <= d.label_dropout < 1.0, "diffusion.label_dropout", "must be in [0, 1)")
  _require(d.schedule in ("scaled_linear", "linear"), "diffusion.schedule",
           f"{d.schedule!r} is not 'scaled_linear' or 'linear'")
  try:
    down = layout_lib.parse_layout(m.down_layout, num_stages=len(m.channels))
    layout_lib.parse_layout(m.mid_layout)
    if m.up_layout:
      layout_lib.parse_layout(m.up_layout, num_stages=len(m.channels))
  except layout_lib.LayoutError as err:
    raise ConfigError(f"config.model: {err}") from None
  for level, (stage, width) in enumerate(zip(down, m.channels)):
    if "T" in stage:
      _require(width % m.head_dim == 0, "model.channels",
               f"level {level + 1} has T blocks and width {width}, not a multiple of head_dim "
               f"{m.head_dim}")
    _require(width % m.norm_groups == 0, "model.norm_groups",
             f"{m.norm_groups} groups do not divide level {level + 1}'s width {width}")
  if not config.data.latent_dir:
    factor = 2 ** (len(m.channels) - 1) * config.data.patch
    _require(config.data.image_size % factor == 0, "data.image_size",
             f"{config.data.image_size} is not divisible by {factor} (the UNet's "
             f"{len(m.channels)} levels x data.patch {config.data.patch})")
    _require(config.data.channels in (1, 3), "data.channels", "must be 1 or 3")
  if e.num_samples > 0:
    _require(bool(e.judge_dir) or bool(e.inception_path and e.reference_path), "eval.num_samples",
             "sample metrics need a judge classifier (eval.judge_dir) or the FID Inception and "
             "reference statistics (eval.inception_path, eval.reference_path)")
  _require(bool(e.inception_path) == bool(e.reference_path), "eval.reference_path",
           "eval.inception_path and eval.reference_path go together")
  if e.train_judge:
    _require(bool(e.judge_config), "eval.judge_config",
             "eval.train_judge needs the judge's config file (e.g. configs/ascan_t.py:runlocal)")


def validate(config: ml_collections.ConfigDict, **kwargs) -> None:
  """All checks; raises ConfigError with one message naming the key."""
  check_keys_and_types(config)
  check_values(config, **kwargs)
