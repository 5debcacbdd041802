"""Building a task's evaluators from ``config.evals`` (the task layer's half of ``eval/``).

``build_standard(task, setup)`` makes a ``DatasetEvaluator`` for every entry of type ``dataset``:
the task's evaluation batches of the entry's split, its ``preprocess`` (with the frozen weights)
followed by ``eval_fn``, and ``summarize_eval``. Tasks with other evaluator types build those
themselves and call this for the rest (``only=("dataset",)``).
"""
from __future__ import annotations

import jax

from ascan_jax.data import pipeline
from ascan_jax.eval import evaluator as evaluator_lib

EVAL_KEY = 1234  # the preprocessing key of evaluation batches (fixed: evaluations repeat exactly).


def dataset_evaluator(task, setup, name: str, cfg) -> evaluator_lib.DatasetEvaluator:
  config = task.config
  split = cfg.split or config.data.eval_split
  sharding = pipeline.Sharding(jax.process_index(), jax.process_count())

  def sum_fn(params, model_state, frozen, batch):
    batch = task.preprocess(frozen, batch, jax.random.key(EVAL_KEY), False)
    return task.eval_fn(params, model_state, batch)

  return evaluator_lib.DatasetEvaluator(
      name=name, every_steps=cfg.every_steps, prefix=cfg.prefix, params=cfg.params,
      batches=lambda: task.eval_batches(sharding, split), sum_fn=sum_fn,
      summarize=task.summarize_eval, mesh=setup.mesh, rules=setup.rules,
      param_shardings=setup.state_shardings.params,
      model_state_shardings=setup.state_shardings.model_state,
      frozen_shardings=setup.frozen_shardings,
      batch_spec=task.input_spec(config.eval_batch_size, train=False),
      global_batch=config.eval_batch_size, host_fields=setup.host_fields)


def build_standard(task, setup, only=("dataset",)) -> dict:
  """``{name: evaluator}`` for the entries of ``config.evals`` whose type is in ``only``."""
  out = {}
  for name in task.config.evals.keys():
    cfg = task.config.evals[name]
    if cfg.type not in only:
      continue
    if cfg.type == "dataset":
      out[name] = dataset_evaluator(task, setup, name, cfg)
  return out
