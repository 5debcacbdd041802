"""The config keys every task shares, with their defaults, and the pieces task schemas reuse.

Each task's full schema is its ``Task.default_config()`` (``ascan_jax.tasks.<task>``), built from
``base()`` here plus its own sections; a config file starts from it and changes values.
``config_validation`` rejects any key that is not in the schema (a typo in a config file or on the
command line), a value of the wrong type, and impossible values. Durations are written as epochs
or steps and resolved by the loop; nothing here is derived from anything else, so overrides never
leave stale values behind. This module imports no JAX.
"""
from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes. With the default mesh (data=-1, fsdp=1, tensor=1) this is plain data
# parallelism; setting mesh.shape to (1, -1, 1) gives FSDP and (d, 1, t) tensor parallelism, with
# the same rules. A mesh axis is used at most once per array (first rule wins), and an axis that
# does not divide a dimension is dropped for that array (see ascan_jax.parallel.sharding).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("classes", "tensor"),
    ("height", None),
    ("width", None),
    ("length", None),
)


def base() -> ml_collections.ConfigDict:
  """Keys shared by every task: seed, duration, optimizer, mesh, checkpoints, logging, bench."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.batch_size = 256  # global batch per optimizer step, over all processes and devices.
  c.eval_batch_size = 256
  c.total_epochs = 1.0
  c.total_steps = -1  # > 0 takes precedence over total_epochs.
  c.microbatches = 1  # gradient accumulation: the batch is split and scanned.

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.schedule = "cosine"  # cosine | constant | linear | poly (after a linear warm-up).
  c.optim.peak_lr = 1e-3
  c.optim.init_lr = 5e-7  # linear warm-up starts here ...
  c.optim.end_lr = 5e-6  # ... and cosine / linear / poly decay ends here.
  c.optim.poly_power = 1.0  # poly: lr = end + (peak - end) * (1 - progress) ** power (mmseg: 1).
  c.optim.warmup_epochs = 0.0
  c.optim.warmup_steps = -1  # >= 0 takes precedence over warmup_epochs.
  c.optim.weight_decay = 0.05  # on kernels only: not on norms, biases, position tables.
  # Parameter groups: (regex on the parameter path 'a/b/kernel', lr multiplier, weight-decay
  # multiplier); the first match wins, unmatched parameters are the default group (1, 1).
  c.optim.groups = ()
  c.optim.layer_decay = 1.0  # < 1: layer-wise lr decay (the task says what a layer is).
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # <= 0 disables clipping.
  c.optim.ema_decay = 0.9999  # 0 disables the EMA.
  c.optim.ema_warmup = False  # decay_t = min(ema_decay, (1 + t) / (10 + t)) (short runs).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # one axis may be -1: all remaining devices.
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.rules = DEFAULT_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3  # the last N checkpoints ...
  c.checkpoint.keep_best = True  # ... plus the best by eval metric.
  c.checkpoint.best_metric = ""  # empty: the task's default metric.
  c.checkpoint.best_mode = ""  # max | min (a loss, FID); empty: the task's default.
  c.checkpoint.async_save = True
  c.checkpoint.step = -1  # --mode=eval: evaluate this step instead of the latest.

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True
  c.log.transfer_guard = False  # jax_transfer_guard='disallow' in the train loop.

  # Evaluators by name (big_vision style): each entry has a ``type`` whose keys the task knows
  # (``Task.evaluator_schemas``); every evaluator runs every ``every_steps``, at the last step
  # and in --mode=eval.
  c.evals = ml_collections.ConfigDict()

  # Warm start of a fresh run from another run's checkpoint (ascan_jax.train.init_from):
  # parameters (and mutable state) only; optimizer, step and data start anew.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.workdir = ""  # a workdir (or its checkpoints/ folder), optionally "DIR:STEP".
  c.init_from.step = -1  # -1: the latest checkpoint there.
  c.init_from.which = "ema"  # ema | raw: which parameters of the checkpoint to load.
  c.init_from.include = ""  # regex on checkpoint parameter paths: load only these ('' = all).
  c.init_from.exclude = ""  # regex: never load these (e.g. '^classifier/').
  c.init_from.rename = ()  # ((regex, replacement), ...) from checkpoint to model paths.
  c.init_from.model_state = True  # also load mutable state (BatchNorm statistics).
  c.init_from.resize_tables = True  # resize relative position tables to the model's grid.

  c.bench = ml_collections.ConfigDict()
  c.bench.batch_sizes = (1, 16, 64)
  c.bench.train_batch_size = 64
  c.bench.warmup = 3
  c.bench.repeats = 10
  c.bench.min_seconds = 1.0  # each timing repeats the call until this much time has passed.
  c.bench.measure_sampling = False  # generative tasks: also time full sampling at batch 64.

  c.summary = ml_collections.ConfigDict()
  c.summary.memory_batch_size = 64  # 0: no memory analysis (MACs and parameters only).
  return c


def dataset_evaluator() -> ml_collections.ConfigDict:
  """An evaluator that sums the task's ``eval_fn`` over an evaluation split."""
  c = ml_collections.ConfigDict()
  c.type = "dataset"
  c.every_steps = 1000
  c.prefix = "eval/"  # metric names: <prefix><ema_?><metric>, e.g. eval/top1, eval/ema_top1.
  c.params = "both"  # raw | ema | both (raw and EMA on the same batches, one pass).
  c.split = ""  # empty: data.eval_split.
  return c


def overlay(defaults: ml_collections.ConfigDict, saved: dict,
            prefix: str = "") -> list[str]:
  """Writes the values of ``saved`` (a config read back from a run's ``config.json``) over
  ``defaults`` in place; returns the keys of ``saved`` the schema no longer has (reported, not
  fatal), so a run written by an older version still loads with today's schema."""
  dropped = []
  with defaults.unlocked():
    for key, value in saved.items():
      if key not in defaults:
        dropped.append(prefix + key)
      elif isinstance(defaults[key], ml_collections.ConfigDict) and isinstance(value, dict):
        if len(defaults[key]) == 0 and value:  # an open section (evals): take it whole.
          defaults[key] = ml_collections.ConfigDict(value)
        else:
          dropped += overlay(defaults[key], value, f"{prefix}{key}.")
      else:
        defaults[key] = tuple(value) if isinstance(value, list) else value
  return dropped


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the text after ``:`` in ``--config=file.py:arg``.

  ``arg`` is comma-separated ``key=value`` pairs or bare flags (``runlocal`` means
  ``runlocal=True``); only keys given in ``defaults`` are accepted, each value is converted to the
  type of its default. ``parse_arg('runlocal', runlocal=False)`` -> ``{'runlocal': True}``.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)} "
                       f"(from ':{arg}')")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value.strip())
  return out
