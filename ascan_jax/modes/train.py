"""The generic training loop (every task) and ``--mode=eval``.

train(): validate -> data -> sharded state (fresh, or restored from DIR/checkpoints with the data
iterator) -> for each step: next batch, global arrays, jitted step -> every ``log.every_steps``
metrics and a progress line; every ``eval.every_steps`` (and at the end) evaluation of the raw
and EMA parameters; every ``checkpoint.every_steps``, at evaluations, at the end and on SIGTERM
a checkpoint. Nothing here knows which task runs: the task supplies model, loss, evaluation and
data.
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
from ascan_jax.perf import peaks
from ascan_jax.perf import summary as summary_lib
from ascan_jax.train import checkpoint as checkpoint_lib
from ascan_jax.train import metrics as metrics_lib
from ascan_jax.train import preemption
from ascan_jax.train import setup as setup_lib


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


def _evaluate_all(evaluator, state, config) -> dict:
  out = {}
  t0 = time.perf_counter()
  for k, v in evaluator.run(state.params, state.model_state).items():
    out[f"eval/{k}"] = v
  if config.eval.ema and config.optim.ema_decay > 0:
    for k, v in evaluator.run(state.ema_params, state.ema_model_state).items():
      out[f"eval/ema_{k}"] = v
  out["eval/seconds"] = time.perf_counter() - t0
  return out


def train(task, config, workdir: str):
  """Trains (or resumes) until ``total_steps``; returns the final state."""
  sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
  setup = setup_lib.build(task, config, task.num_train_examples())
  total = setup.durations.total_steps
  global_batch = config.batch_size
  local_batch = sharding.local(global_batch)
  ckpt = checkpoint_lib.Checkpointer(
      workdir, config, best_metric=config.checkpoint.best_metric or task.default_metric)
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
    state = setup_lib.create_state(setup)
    start = 0
  _save_config(config, workdir, setup.durations, start)
  writer = metrics_lib.MetricWriter(workdir, is_main=jax.process_index() == 0,
                                    tensorboard=config.log.tensorboard,
                                    resume_step=start)
  evaluator = evaluator_lib.Evaluator(task, config, setup.mesh, setup.rules,
                                      setup.state_shardings.params,
                                      setup.state_shardings.model_state)
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
      device_batch = global_batch_lib.to_global(batch, setup.mesh, setup.rules, global_batch)
      if config.log.transfer_guard:
        with jax.transfer_guard("disallow"):
          state, metrics = setup.train_step(state, device_batch)
      else:
        state, metrics = setup.train_step(state, device_batch)
      done = step + 1
      scalars = None
      if done % config.log.every_steps == 0 or done == total:
        scalars = _scalars(metrics)
        scalars["data/skipped_records"] = skipped
        scalars["epoch"] = done / setup.durations.steps_per_epoch
        perf = progress.line(done, scalars, global_batch, jax.device_count())
        scalars.update(perf)
        scalars["perf/images_per_second"] = perf["perf/examples_per_second"]
      if hasattr(task, "on_step"):  # e.g. sample grids of a generative task.
        task.on_step(state, setup, done, workdir)
      eval_metrics = None
      if done % config.eval.every_steps == 0 or done == total:
        eval_metrics = _evaluate_all(evaluator, state, config)
        if hasattr(task, "sample_evaluation"):  # metrics of generated samples.
          eval_metrics.update(task.sample_evaluation(state, setup, done, workdir))
        logging.info("step %d eval: %s", done, eval_metrics)
        print(f"step {done} eval: " + "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in eval_metrics.items()), flush=True)
        scalars = {**(scalars or {}), **eval_metrics}
      if scalars is not None:
        writer.write(done, scalars)
      stop = watcher.should_stop(done)
      if (done % config.checkpoint.every_steps == 0 or done == total or stop
          or eval_metrics is not None):
        ckpt.save(done, state, iterator, {**meta, "step": done}, metrics=eval_metrics,
                  force=stop or done == total)
      if stop:
        logging.warning("preempted: checkpoint at step %d written, exiting", done)
        print(f"preempted: checkpoint at step {done} written, exiting", flush=True)
        break
  finally:
    watcher.close()
    ckpt.close()
    writer.close()
  return state


def evaluate(task, config, workdir: str) -> dict:
  """``--mode=eval``: evaluates the latest checkpoint (or ``config.checkpoint.step``)."""
  ckpt = checkpoint_lib.Checkpointer(
      workdir, config, best_metric=config.checkpoint.best_metric or task.default_metric)
  step = config.checkpoint.step if config.checkpoint.step >= 0 else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory} to evaluate")
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory}; "
                            f"available: {ckpt.all_steps()}")
  setup = setup_lib.build(task, config, task.num_train_examples())
  state, _, _ = ckpt.restore(step, setup.abstract_state)
  evaluator = evaluator_lib.Evaluator(task, config, setup.mesh, setup.rules,
                                      setup.state_shardings.params,
                                      setup.state_shardings.model_state)
  results = {"step": step, **_evaluate_all(evaluator, state, config)}
  if hasattr(task, "sample_evaluation"):
    results.update(task.sample_evaluation(state, setup, step, workdir))
  ckpt.close()
  if jax.process_index() == 0:
    fileio.append_line(fileio.join(workdir, "eval.jsonl"), json.dumps(results))
  print(json.dumps(results, indent=2), flush=True)
  return results
