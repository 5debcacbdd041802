"""Warm start: a fresh run's parameters loaded from another run's checkpoint (``config.init_from``).

Only parameters (and, with ``init_from.model_state``, mutable state such as BatchNorm statistics)
are loaded; the optimizer state, the step and the data stream start anew. That is what the
multi-stage text-to-image chain (each stage starts from the previous stage's weights), fine-tuning
at another resolution (224 -> 288/384) and a segmentation backbone initialised from a classifier
need. It runs only when the run's own workdir holds no checkpoint; a restarted run resumes from its
own checkpoints instead.

Mapping: every parameter path of the checkpoint (``stage2_block4_T/attention/rel_pos/table``;
``which`` picks its raw or EMA parameters) that matches ``include`` and not ``exclude`` (regexes,
``re.search``) is renamed by the ``rename`` rules (``(regex, replacement)`` applied in turn with
``re.sub``; ``('^', 'backbone/')`` puts a classifier under a segmentation model's ``backbone``)
and loaded into the model parameter of that name. The loaded values initialise both the
parameters and their EMA. Relative position tables (``.../rel_pos/table``) whose grid differs are
resized to the model's grid (``attention.resize_relative_position_table``: bilinear, offset 0
kept exactly); any other shape difference is an error naming every such parameter (exclude them to
train them from scratch). The report lists what was loaded, resized, filtered out, unused (no
model parameter of that name) and left at its initial value (no checkpoint parameter), and is
written to ``DIR/init_from.json``.

Only the needed arrays are read (orbax partial restore), each straight into its target sharding,
so a large model is never whole on one device.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from ascan_jax import fileio
from ascan_jax.models import attention
from ascan_jax.train import optim

TABLE_SUFFIX = "rel_pos/table"


class InitFromError(ValueError):
  """A warm start that cannot be done; the message names the checkpoint and the parameters."""


@dataclasses.dataclass
class Report:
  source: str
  step: int
  which: str
  loaded: list = dataclasses.field(default_factory=list)  # (checkpoint name, model name)
  resized: list = dataclasses.field(default_factory=list)  # (model name, from shape, to shape)
  filtered: list = dataclasses.field(default_factory=list)  # include/exclude kept these out.
  unused: list = dataclasses.field(default_factory=list)  # no model parameter of that name.
  not_loaded: list = dataclasses.field(default_factory=list)  # model params left at init.

  def summary(self) -> str:
    return (f"init_from {self.source} step {self.step} ({self.which}): loaded "
            f"{len(self.loaded)} arrays ({len(self.resized)} resized), filtered out "
            f"{len(self.filtered)}, unused {len(self.unused)}, left at their initial value "
            f"{len(self.not_loaded)}" + (f" (e.g. {', '.join(self.not_loaded[:4])})"
                                         if self.not_loaded else ""))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def checkpoint_location(spec: str, step: int = -1) -> tuple[str, int]:
  """``(checkpoints directory, step)`` for ``DIR`` / ``DIR:STEP`` / ``DIR/checkpoints``."""
  path, explicit = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit() and head and not head.endswith(":/"):
    path, explicit = head, int(tail)
  path = path.rstrip("/")
  candidates = [fileio.join(path, "checkpoints"), path]
  directory = next((c for c in candidates if fileio.exists(c) and _steps(c)), None)
  if directory is None:
    raise InitFromError(f"config.init_from.workdir={spec!r}: no checkpoint found (looked in "
                        f"{' and '.join(candidates)})")
  steps = _steps(directory)
  wanted = explicit if explicit is not None else (step if step >= 0 else max(steps))
  if wanted not in steps:
    raise InitFromError(f"config.init_from: no checkpoint for step {wanted} in {directory}; "
                        f"available: {steps}")
  return directory, wanted


def _steps(directory: str) -> list[int]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = []
  for p in epath.Path(directory).iterdir():
    if p.name.isdigit() and (p / "state").exists():
      out.append(int(p.name))
  return sorted(out)


def state_metadata(item_dir: str):
  """The saved tree of a checkpoint's ``state`` item: shapes and dtypes, no array data."""
  meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  return {optim.path_string(path): leaf for path, leaf in leaves}


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    parts = name.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree


def _plan(source: dict, target: dict, cfg, report: Report, prefix: str):
  """{model name: (checkpoint name, needs resize)} for one tree; shape errors collected."""
  plan, errors = {}, []
  for name, meta in sorted(source.items()):
    if (cfg.include and not re.search(cfg.include, name)) or (
        cfg.exclude and re.search(cfg.exclude, name)):
      report.filtered.append(prefix + name)
      continue
    dest = name
    for pattern, replacement in cfg.rename:
      dest = re.sub(pattern, replacement, dest)
    if dest not in target:
      report.unused.append(prefix + name)
      continue
    src_shape, dst_shape = tuple(meta.shape), tuple(target[dest].shape)
    resize = False
    if src_shape != dst_shape:
      if (cfg.resize_tables and dest.endswith(TABLE_SUFFIX) and len(src_shape) == 3
          and src_shape[0] == dst_shape[0]):
        resize = True
        report.resized.append((prefix + dest, list(src_shape), list(dst_shape)))
      else:
        errors.append(f"{prefix}{name} -> {prefix}{dest}: checkpoint {src_shape} vs model "
                      f"{dst_shape}")
        continue
    plan[dest] = (name, resize)
    report.loaded.append((prefix + name, prefix + dest))
  report.not_loaded.extend(prefix + n for n in sorted(set(target) - set(plan)))
  return plan, errors


def warm_start(state, state_shardings, cfg, mesh, workdir: str | None = None):
  """``(state with loaded params, EMA and model state, Report)``; see the module docstring."""
  directory, step = checkpoint_location(cfg.workdir, cfg.step)
  which = cfg.which
  item_dir = os.path.join(directory, str(step), "state")
  metadata = state_metadata(item_dir)
  src_params_key = "ema_params" if which == "ema" else "params"
  src_state_key = "ema_model_state" if which == "ema" else "model_state"
  report = Report(source=directory, step=step, which=which)
  try:
    src_params = _flat(metadata[src_params_key])
  except (KeyError, TypeError):
    raise InitFromError(f"{directory}/{step} holds no {src_params_key!r}: not a checkpoint of "
                        "this codebase's training loop") from None
  # One entry per tree: (checkpoint key, collection or None, source, target, shardings);
  # mutable state is matched per collection (batch_stats, ...), by the same names as params.
  trees = [(src_params_key, None, src_params, _flat(state.params),
            _flat(state_shardings.params))]
  if cfg.model_state and state.model_state:
    saved_state = metadata.get(src_state_key) or {} if hasattr(metadata, "get") else {}
    for collection in state.model_state:
      trees.append((src_state_key, collection, _flat(saved_state.get(collection, {})),
                    _flat(state.model_state[collection]),
                    _flat(state_shardings.model_state[collection])))
  replicated = NamedSharding(mesh, P())
  plans, errors = [], []
  item, restore_args = {}, {}
  for src_key, collection, source, target, shardings in trees:
    prefix = "" if collection is None else f"state:{collection}/"
    plan, errs = _plan(source, target, cfg, report, prefix)
    errors += errs
    plans.append(plan)
    flat_item, flat_args = {}, {}
    for dest, (name, resize) in plan.items():
      sharding = replicated if resize else shardings[dest]
      meta = source[name]
      flat_item[name] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)
      flat_args[name] = ocp.ArrayRestoreArgs(sharding=sharding)
    if flat_item:
      if collection is None:
        item[src_key], restore_args[src_key] = _unflatten(flat_item), _unflatten(flat_args)
      else:
        item.setdefault(src_key, {})[collection] = _unflatten(flat_item)
        restore_args.setdefault(src_key, {})[collection] = _unflatten(flat_args)
  if errors:
    raise InitFromError(
        f"config.init_from: {len(errors)} parameter(s) of {directory}/{step} have another shape "
        f"in this model (exclude them with config.init_from.exclude to train them from "
        f"scratch):\n  " + "\n  ".join(errors))
  if not report.loaded:
    raise InitFromError(f"config.init_from: nothing of {directory}/{step} matches this model "
                        f"({len(report.filtered)} filtered out, {len(report.unused)} without a "
                        f"model parameter of the same name, e.g. {report.unused[:3]}); check "
                        "include/exclude/rename")
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir,
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  params, model_state = None, {}
  for (src_key, collection, source, target, shardings), plan in zip(trees, plans):
    got = restored.get(src_key, {})
    got = _flat(got if collection is None else got.get(collection, {}))
    merged = dict(target)
    for dest, (name, resize) in plan.items():
      value = got[name]
      if resize:
        shape = target[dest].shape
        value = attention.resize_relative_position_table(
            value, (shape[1] + 1) // 2, (shape[2] + 1) // 2)
        value = jax.device_put(value.astype(target[dest].dtype), shardings[dest])
      merged[dest] = value
    if collection is None:
      params = _unflatten(merged)
    else:
      model_state[collection] = _unflatten(merged)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  state = state.replace(params=params, ema_params=copy(params))
  if model_state:
    state = state.replace(model_state=model_state, ema_model_state=copy(model_state))
  if workdir is not None and jax.process_index() == 0:
    fileio.makedirs(workdir)
    fileio.write_text(fileio.join(workdir, "init_from.json"),
                      json.dumps(report.to_json(), indent=2, default=np.asarray))
  return state, report
