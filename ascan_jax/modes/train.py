"""The generic training loop (every task).

train(): prerequisites (e.g. a judge classifier) -> sharded state (restored from DIR/checkpoints
with the data iterator, or fresh, or warm-started from ``config.init_from``) and frozen weights
-> for each step: next batch, global arrays, jitted step ``(state, frozen, batch)`` -> every
``log.every_steps`` metrics and a progress line; each evaluator of ``config.evals`` every
``every_steps`` (and at the end); every ``checkpoint.every_steps``, after evaluations, at the end
and on SIGTERM a checkpoint. Nothing here knows which task runs: the task supplies model, loss,
evaluators and data through ``ascan_jax.tasks.base.Task``.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import logging

from ascan_jax import fileio
from ascan_jax.data import global_batch as global_batch_lib
from ascan_jax.data import pipeline
from ascan_jax.eval import evaluator as evaluator_lib
from ascan_jax.modes import prerequisites
from ascan_jax.modes import summary as summary_lib
from ascan_jax.perf import peaks
from ascan_jax.train import builder
from ascan_jax.train import checkpoint as checkpoint_lib
from ascan_jax.train import init_from as init_from_lib
from ascan_jax.train import metrics as metrics_lib
from ascan_jax.train import preemption


class DataOrderError(RuntimeError):
  """The data stream is not where the restored step says it should be."""


def _save_config(config, workdir: str, durations, start_step: int) -> None:
  if jax.process_index() != 0:
    return
  fileio.makedirs(workdir)
  resolved = json.loads(config.to_json_best_effort())
  path = fileio.join(workdir, "config.json")
  if fileio.exists(path):
    old = json.loads(fileio.read_text(path)).get("config", {})
    changed = _diff(old, resolved)
    if changed:
      logging.warning("config differs from the one in %s: %s", path, "; ".join(changed[:20]))
  record = {"config": resolved, "resolved": {"total_steps": durations.total_steps,
                                             "warmup_steps": durations.warmup_steps,
                                             "steps_per_epoch": durations.steps_per_epoch},
            "started_at_step": start_step, "jax_version": jax.__version__,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind}
  fileio.write_text(path, json.dumps(record, indent=2))
  fileio.append_line(fileio.join(workdir, "config_history.jsonl"), json.dumps(record))


def _diff(old, new, prefix=""):
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def _scalars(tree) -> dict:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


def _mfu_setup(task, config):
  """(forward MACs per example, peak FLOP/s per device) for the MFU in the progress line."""
  try:
    model = task.build_model(attention_impl="xla")
    macs = summary_lib.count_forward_macs(task, model, summary_lib.abstract_variables(task, model))
    peak, _ = peaks.peak_flops(jax.devices()[0], task.dtype)
    return macs["macs"], peak
  except Exception as e:  # MFU is informative only; never block training on it.
    logging.warning("MFU unavailable: %s", e)
    return None, None


def variants(state) -> dict:
  """The parameter sets evaluators may ask for."""
  return {"raw": (state.params, state.model_state),
          "ema": (state.ema_params, state.ema_model_state)}


def run_evaluators(evaluators: dict, state, setup, step: int, workdir: str,
                   due=lambda ev: True) -> dict:
  """Runs the evaluators that are ``due``; returns their metrics (with ``eval/seconds``)."""
  inputs = evaluator_lib.EvalInputs(variants(state), setup.frozen, step, workdir)
  out = {}
  t0 = time.perf_counter()
  ran = False
  for name, ev in evaluators.items():
    if due(ev):
      ran = True
      logging.info("step %d: evaluator %s", step, name)
      out.update(ev.run(inputs))
  if ran and out:
    out["eval/seconds"] = time.perf_counter() - t0
  return out


def format_metrics(metrics: dict) -> str:
  return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in metrics.items())


def train(task, config, workdir: str):
  """Trains (or resumes) until ``total_steps``; returns the final state."""
  prerequisites.ensure(task)
  sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
  setup = builder.build(task, config, task.num_train_examples())
  total = setup.durations.total_steps
  global_batch = config.batch_size
  local_batch = sharding.local(global_batch)
  metric, mode = builder.best_settings(task, config)
  ckpt = checkpoint_lib.Checkpointer(workdir, config, best_metric=metric, best_mode=mode)
  latest = ckpt.latest_step()
  iterator = iter(task.train_batches(sharding, total, 0))
  if latest is not None:
    state, meta, data_restored = ckpt.restore(latest, setup.abstract_state, iterator)
    start = int(jax.device_get(state.step))
    if not data_restored:  # another process count: rebuild the stream at the restored step.
      iterator = iter(task.train_batches(sharding, total, start))
    logging.info("resumed from step %d (data iterator %s)", start,
                 "restored" if data_restored else "rebuilt from the step")
  else:
    state = builder.create_state(setup)
    start = 0
    if config.init_from.workdir:
      state, report = init_from_lib.warm_start(state, setup.state_shardings, config.init_from,
                                               setup.mesh, workdir)
      logging.info(report.summary())
      if jax.process_index() == 0:
        print(report.summary(), flush=True)
  _save_config(config, workdir, setup.durations, start)
  writer = metrics_lib.MetricWriter(workdir, is_main=jax.process_index() == 0,
                                    tensorboard=config.log.tensorboard,
                                    resume_step=start)
  evaluators = task.make_evaluators(setup)
  macs, peak = _mfu_setup(task, config)
  meta = {"param_shapes": checkpoint_lib.param_shapes(setup.abstract_state.params),
          "process_count": jax.process_count(), "has_data": True, "task": config.task,
          "global_batch": global_batch}
  progress = metrics_lib.Progress(start, total, 6.0 * macs if macs else None, peak)
  watcher = preemption.PreemptionWatcher()
  skipped = 0
  logging.info("training steps %d..%d, global batch %d over %d devices", start, total,
               global_batch, jax.device_count())
  try:
    for step in range(start, total):
      batch = next(iterator)
      expected = step * global_batch + sharding.process_index * local_batch
      if int(batch["index"][0]) != expected:
        raise DataOrderError(f"step {step}: the data stream is at position "
                             f"{int(batch['index'][0])}, expected {expected}")
      skipped += int(local_batch - np.sum(batch["mask"]))
      device_batch = global_batch_lib.to_global(batch, setup.mesh, setup.rules, global_batch,
                                                setup.host_fields)
      if config.log.transfer_guard:
        with jax.transfer_guard("disallow"):
          state, metrics = setup.train_step(state, setup.frozen, device_batch)
      else:
        state, metrics = setup.train_step(state, setup.frozen, device_batch)
      done = step + 1
      scalars = None
      if done % config.log.every_steps == 0 or done == total:
        scalars = _scalars(metrics)
        scalars["data/skipped_records"] = skipped
        scalars["epoch"] = done / setup.durations.steps_per_epoch
        perf = progress.line(done, scalars, global_batch, jax.device_count())
        scalars.update(perf)
        scalars["perf/images_per_second"] = perf["perf/examples_per_second"]
      eval_metrics = run_evaluators(
          evaluators, state, setup, done, workdir,
          due=lambda ev: done % ev.every_steps == 0 or done == total)
      if eval_metrics:
        logging.info("step %d eval: %s", done, eval_metrics)
        print(f"step {done} eval: {format_metrics(eval_metrics)}", flush=True)
        scalars = {**(scalars or {}), **eval_metrics}
      if scalars is not None:
        writer.write(done, scalars)
      stop = watcher.should_stop(done)
      if (done % config.checkpoint.every_steps == 0 or done == total or stop
          or eval_metrics):
        ckpt.save(done, state, iterator, {**meta, "step": done},
                  metrics=eval_metrics or None, force=stop or done == total)
      if stop:
        logging.warning("preempted: checkpoint at step %d written, exiting", done)
        print(f"preempted: checkpoint at step {done} written, exiting", flush=True)
        break
  finally:
    watcher.close()
    ckpt.close()
    writer.close()
  return state
