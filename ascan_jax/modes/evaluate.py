"""``--mode=eval``: every evaluator of ``config.evals`` on a checkpoint (the latest, or
``config.checkpoint.step``); results are printed and appended to ``DIR/eval.jsonl``. Needs no
training data."""
from __future__ import annotations

import json

import jax

from ascan_jax import fileio
from ascan_jax.modes import prerequisites
from ascan_jax.modes import train as train_mode
from ascan_jax.train import builder


def evaluate(task, config, workdir: str) -> dict:
  context = builder.restore(task, config, workdir, config.checkpoint.step)
  task.preflight("eval")
  prerequisites.ensure(task, workdir)
  evaluators = task.make_evaluators(context.setup)
  results = {"step": context.step,
             **train_mode.run_evaluators(evaluators, context.state, context.setup, context.step,
                                         workdir)}
  if jax.process_index() == 0:
    fileio.append_line(fileio.join(workdir, "eval.jsonl"), json.dumps(results))
  print(json.dumps(results, indent=2), flush=True)
  return results
