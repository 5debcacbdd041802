"""Checkpoints with orbax ``CheckpointManager``: atomic, async, keep-last-N plus the best.

Each checkpoint holds two items:
* ``state``: the whole ``TrainState`` (params, optimizer state, EMA, model state, step, rng);
* ``meta``: JSON with the step, the process count, the global batch, the skipped-record count and
  the model's parameter shapes, so a checkpoint from another model is refused with a message
  listing what differs.
The data stream is not saved: the record at every global position is a pure function of the seed
and the position (``data.order``), so a resumed run rebuilds it from the step, whatever the
number of processes or workers (restoring a worker pool's state would tie the checkpoint to
``data.worker_count``).

Damaged checkpoints (a truncated array file, a missing ``_METADATA``, a missing item directory,
anything orbax cannot read) are found on restore: ``restore_latest_intact`` names each damaged
one and what is wrong with it, moves it aside to ``DIR/checkpoints_damaged/`` (never deleting
it) and resumes from the newest intact one. Read-only modes (``--mode=eval``/``sample``) name a
damaged checkpoint and stop (``CheckpointDamagedError``), and never create directories.
Frozen weights (a text encoder, a VAE) are never written: they come from their own source.
The best checkpoint is kept by ``checkpoint.best_metric`` in the direction ``best_mode`` (max for
accuracy, min for a loss or an FID).
orbax writes into a temporary directory and renames it when complete, so a process killed at
any moment (SIGKILL) leaves at most an unfinished temporary directory, which is ignored; the
run resumes from the last complete step. Restores take the *current* shardings as targets, so a
checkpoint written on N devices (or processes) restores onto M.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from ascan_jax import fileio


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the current model."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint that cannot be read; the message names it and what is wrong."""


DAMAGED_DIR = "checkpoints_damaged"


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ""
  return f"{type(e).__name__}: {line[:300]}"


def param_shapes(params) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): list(np.shape(x)) for path, x in flat}


def describe_mismatch(saved: dict, current: dict, limit: int = 8) -> str:
  missing = sorted(set(current) - set(saved))
  unexpected = sorted(set(saved) - set(current))
  shapes = sorted(k for k in set(saved) & set(current) if list(saved[k]) != list(current[k]))
  parts = []
  if shapes:
    parts.append(f"{len(shapes)} parameter(s) with other shapes, e.g. " + "; ".join(
        f"{k}: checkpoint {tuple(saved[k])} vs model {tuple(current[k])}" for k in shapes[:limit]))
  if missing:
    parts.append(f"{len(missing)} parameter(s) the checkpoint lacks, e.g. "
                 + ", ".join(missing[:limit]))
  if unexpected:
    parts.append(f"{len(unexpected)} parameter(s) the model lacks, e.g. "
                 + ", ".join(unexpected[:limit]))
  return "; ".join(parts)


class Checkpointer:
  """Saves and restores train state, data-iterator state and metadata under ``DIR/checkpoints``."""

  def __init__(self, workdir: str, config, *, best_metric: str, best_mode: str = "max",
               read_only: bool = False):
    self.workdir = os.path.abspath(workdir) if "://" not in workdir else workdir.rstrip("/")
    self.directory = fileio.join(self.workdir, "checkpoints")
    self.read_only = read_only
    c = config.checkpoint
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=c.keep)]
    if best_mode not in ("max", "min"):
      raise ValueError(f"best checkpoint mode {best_mode!r} is not 'max' or 'min'")
    self.best_mode = best_mode
    if c.keep_best and best_metric:
      # BestN keeps the largest metric unless reversed: a loss or an FID keeps the smallest.
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self._options = dict(
        enable_async_checkpointing=c.async_save,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    self.manager = self._open()

  def _open(self):
    if self.read_only and not fileio.exists(self.directory):
      return None
    return ocp.CheckpointManager(self.directory,
                                 options=ocp.CheckpointManagerOptions(**self._options),
                                 item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return None if self.manager is None else self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return [] if self.manager is None else sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()

  def step_directory(self, step: int) -> str:
    return fileio.join(self.directory, str(step))

  def inspect(self, step: int) -> str | None:
    """What is structurally wrong with checkpoint ``step`` (a missing item directory or
    metadata file), or None. Damage inside array files shows only when they are read."""
    base = self.step_directory(step)
    for item in ("state", "meta"):
      if not fileio.exists(fileio.join(base, item)):
        return f"its {item!r} item directory is missing"
    if not fileio.exists(fileio.join(base, "_CHECKPOINT_METADATA")):
      return "its _CHECKPOINT_METADATA file is missing"
    if not fileio.exists(fileio.join(base, "state", "_METADATA")):
      return "state/_METADATA is missing"
    return None

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step``; ``CheckpointDamagedError`` names a checkpoint
    that cannot be read, ``CheckpointMismatchError`` one of another model."""
    problem = self.inspect(step)
    if problem:
      raise CheckpointDamagedError(f"checkpoint {self.step_directory(step)} is damaged: "
                                   f"{problem}")
    try:
      meta = self.read_meta(step)
    except Exception as e:  # orbax raises many kinds for unreadable files.
      raise CheckpointDamagedError(f"checkpoint {self.step_directory(step)} is damaged: its "
                                   f"metadata cannot be read ({_first_line(e)})") from None
    current = param_shapes(abstract_state.params)
    saved = meta.get("param_shapes")
    if saved is not None and saved != current:
      raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} was written by a different model: "
          f"{describe_mismatch(saved, current)}. Use another --workdir, or the config that "
          f"wrote it.")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # a truncated or corrupt array file, a broken tree, ...
      raise CheckpointDamagedError(f"checkpoint {self.step_directory(step)} is damaged: reading "
                                   f"it failed ({_first_line(e)})") from None
    return restored["state"], meta

  def set_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` to ``DIR/checkpoints_damaged/<step>[-k]`` (process 0; every
    process waits for it) and reopens the manager; returns the new path."""
    target = fileio.join(self.workdir, DAMAGED_DIR, str(step))
    k = 1
    while fileio.exists(target):
      target = fileio.join(self.workdir, DAMAGED_DIR, f"{step}-{k}")
      k += 1
    if jax.process_index() == 0:
      fileio.makedirs(fileio.join(self.workdir, DAMAGED_DIR))
      fileio.rename(self.step_directory(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.close()
    self.manager = self._open()
    return target

  def restore_latest_intact(self, abstract_state):
    """``(state, meta, step, damaged)`` of the newest checkpoint that can be read, or
    ``(None, None, None, damaged)`` when none can; ``damaged`` lists ``(step, what is wrong,
    where it was moved)`` for every checkpoint set aside on the way."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
        return state, meta, step, damaged
      except CheckpointDamagedError as e:
        message = str(e)
        path = self.set_aside(step)
        logging.warning("%s; moved to %s", message, path)
        damaged.append((step, message, path))
    return None, None, None, damaged

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
