"""Checkpoints with orbax ``CheckpointManager``: atomic, async, keep-last-N plus the best.

Each checkpoint holds three items:
* ``state``: the whole ``TrainState`` (params, optimizer state, EMA, model state, step, rng);
* ``data``: grain's iterator state for this process (one file per process);
* ``meta``: JSON with the step, the process count, the data position and the model's parameter
  shapes, so a checkpoint from another model is refused with a message listing what differs.
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

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the current model."""


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

  def __init__(self, workdir: str, config, *, best_metric: str, best_mode: str = "max"):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints") \
        if "://" not in workdir else workdir.rstrip("/") + "/checkpoints"
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
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=c.async_save,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state, data_iterator=None) -> tuple[Any, dict, bool]:
    """(state, meta, whether the data iterator was restored) of checkpoint ``step``."""
    meta = self.read_meta(step)
    current = param_shapes(abstract_state.params)
    saved = meta.get("param_shapes")
    if saved is not None and saved != current:
      raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} was written by a different model: "
          f"{describe_mismatch(saved, current)}. Use another --workdir, or the config that "
          f"wrote it.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    same_topology = meta.get("process_count") == jax.process_count()
    restore_data = data_iterator is not None and same_topology and meta.get("has_data", False)
    if restore_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], meta, restore_data

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
