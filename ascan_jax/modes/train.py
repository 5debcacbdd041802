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
    try:  # count with the reference attention, whatever kernel the run uses.
      model = task.build_model(attention_impl="xla")
    except TypeError:  # a model without attention implementations.
      model = task.build_model()
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


class Interrupted(Exception):
  """The run stopped on a signal after writing its checkpoint; ``exit_code`` for the shell."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def _global_sum(value: int) -> int:
  """``value`` summed over processes (host-side counters such as skipped records)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _restore_or_start(task, config, setup, ckpt, workdir: str):
  """``(state, start step, skipped records so far)``: the newest intact checkpoint (damaged
  ones named and set aside), else a fresh state, warm-started when ``config.init_from`` says."""
  if ckpt.all_steps():
    state, meta, step, damaged = ckpt.restore_latest_intact(setup.abstract_state)
    for bad_step, message, path in damaged:
      say(f"{message}; moved it to {path}" + (f", resuming from step {step}" if state is not None
                                                else ""))
    if state is not None:
      say(f"resumed from step {step} of {workdir} (data stream rebuilt from the step)")
      return state, int(jax.device_get(state.step)), int(meta.get("skipped_records", 0))
    say(f"no intact checkpoint left in {ckpt.directory}: starting from scratch")
  state = builder.create_state(setup)
  if config.init_from.workdir:
    state, report = init_from_lib.warm_start(state, setup.state_shardings, config.init_from,
                                             setup.mesh, workdir)
    say(report.summary())
  return state, 0, 0


def say(line: str) -> None:
  """A line for the user: printed by process 0 and kept in the log."""
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)


def train(task, config, workdir: str):
  """Trains (or resumes) until ``total_steps``; returns the final state. Raises
  ``Interrupted`` after writing a checkpoint when SIGTERM or Ctrl-C stopped it."""
  prerequisites.ensure(task, workdir)
  sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
  setup = builder.build(task, config, task.num_train_examples())
  total = setup.durations.total_steps
  global_batch = config.batch_size
  local_batch = sharding.local(global_batch)
  metric, mode = builder.best_settings(task, config)
  task.preflight("train")  # every dataset the run reads, before anything is written.
  ckpt = checkpoint_lib.Checkpointer(workdir, config, best_metric=metric, best_mode=mode)
  try:
    state, start, skipped_before = _restore_or_start(task, config, setup, ckpt, workdir)
  except BaseException:
    ckpt.close()
    raise
  if start >= total:
    ckpt.close()
    say(f"the run in {workdir} is complete at step {start} (total_steps {total}); its metrics "
        f"are in {fileio.join(workdir, 'metrics.jsonl')} and its checkpoints in "
        f"{ckpt.directory}. Nothing to do (use --mode=eval to evaluate it again).")
    return state
  iterator = iter(task.train_batches(sharding, total, start))
  _save_config(config, workdir, setup.durations, start)
  writer = metrics_lib.MetricWriter(workdir, is_main=jax.process_index() == 0,
                                    tensorboard=config.log.tensorboard,
                                    resume_step=start)
  evaluators = task.make_evaluators(setup)
  macs, peak = _mfu_setup(task, config)
  meta = {"param_shapes": checkpoint_lib.param_shapes(setup.abstract_state.params),
          "process_count": jax.process_count(), "task": config.task,
          "global_batch": global_batch}
  progress = metrics_lib.Progress(start, total, 6.0 * macs if macs else None, peak)
  watcher = preemption.PreemptionWatcher()
  skipped = 0  # this process's skipped records since the start (global sum: skipped_before +).
  batch_shapes: set = set()  # the step compiles once per distinct batch shape (buckets).
  in_flight = None  # metrics of the previous step: at most one step runs ahead of the host.
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
      shapes = tuple(sorted((k, v.shape) for k, v in device_batch.items()))
      if shapes not in batch_shapes:
        batch_shapes.add(shapes)
        logging.info("step %d: new batch shapes %s: compilation %d of the train step", step,
                     dict(shapes), len(batch_shapes))
      if config.log.transfer_guard:
        with jax.transfer_guard("disallow"):
          state, metrics = setup.train_step(state, setup.frozen, device_batch)
      else:
        state, metrics = setup.train_step(state, setup.frozen, device_batch)
      done = step + 1
      watcher.current_step = done
      if in_flight is not None:  # a signal is acted on within one step (see preemption.py).
        jax.block_until_ready(in_flight)
      else:  # the first step (with compilation) finished: the ETA counts from here.
        jax.block_until_ready(metrics)
        progress.first_step_done(done)
      in_flight = metrics
      scalars = None
      if done % config.log.every_steps == 0 or done == total:
        scalars = _scalars(metrics)
        scalars["data/skipped_records"] = skipped_before + _global_sum(skipped)
        scalars["perf/step_compilations"] = len(batch_shapes)
        scalars["epoch"] = done / setup.durations.steps_per_epoch
        perf = progress.line(done, scalars, global_batch, jax.device_count())
        scalars.update(perf)
        scalars["perf/images_per_second"] = perf["perf/examples_per_second"]
      eval_metrics = run_evaluators(
          evaluators, state, setup, done, workdir,
          due=lambda ev: done % ev.every_steps == 0 or done == total)
      if eval_metrics:
        logging.info("step %d eval: %s", done, eval_metrics)
        if jax.process_index() == 0:
          print(f"step {done} eval: {format_metrics(eval_metrics)}", flush=True)
        scalars = {**(scalars or {}), **eval_metrics}
      if scalars is not None:
        writer.write(done, scalars)
      stop = watcher.should_stop(done)
      if (done % config.checkpoint.every_steps == 0 or done == total or stop
          or eval_metrics):
        ckpt.save(done, state, {**meta, "step": done,
                                "skipped_records": skipped_before + _global_sum(skipped)},
                  metrics=eval_metrics or None, force=stop or done == total)
      if stop:
        ckpt.wait()
        message = (f"stopped by {watcher.signal_name} during step {watcher.step_at_signal}: "
                   f"checkpoint at step {done} written to {ckpt.directory}; run the same "
                   "command to resume")
        say(message)
        raise Interrupted(message, watcher.exit_code)
  finally:
    watcher.close()
    ckpt.close()
    writer.close()
  return state
