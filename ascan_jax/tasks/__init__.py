"""Tasks: the only task-specific code (model, loss, evaluation, data, sampling).

``get_task(config)`` imports ``ascan_jax.tasks.<config.task>`` and returns its ``Task``. A task
provides:
  build_model(**overrides), init_variables(key), input_spec(batch_size, train),
  loss_fn(params, model_state, batch, key), eval_fn(params, model_state, batch),
  summarize_eval(sums), forward(variables, inputs), synthetic_batch(batch_size, key),
  train_source(...) / eval_source(...), default_metric.
"""
from __future__ import annotations

import importlib


def get_task(config):
  module = importlib.import_module(f"ascan_jax.tasks.{config.task}")
  return module.Task(config)
