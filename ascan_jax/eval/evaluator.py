"""The generic evaluator: a task's ``eval_fn`` summed over its evaluation batches.

``eval_fn`` returns per-batch *sums* (correct predictions, loss, example count, ...) computed with
the padding mask, so adding them over batches and processes counts every example exactly once;
``summarize_eval`` turns the totals into metrics. Used in the loop (raw and EMA parameters) and
by ``--mode=eval``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ascan_jax.data import global_batch as global_batch_lib
from ascan_jax.data import pipeline
from ascan_jax.train import setup as setup_lib


class Evaluator:

  def __init__(self, task, config, mesh, rules, param_shardings, model_state_shardings):
    self.task = task
    self.config = config
    self.mesh = mesh
    self.rules = rules
    spec = task.input_spec(config.eval_batch_size, train=False)
    batch_shardings = setup_lib.batch_shardings_for(spec, mesh, rules)

    def eval_step(params, model_state, batch):
      with setup_lib.in_mesh(mesh, rules):
        return task.eval_fn(params, model_state, batch)

    self._step = jax.jit(eval_step, in_shardings=(param_shardings, model_state_shardings,
                                                  batch_shardings),
                         out_shardings=NamedSharding(mesh, P()))

  def run(self, params, model_state) -> dict:
    sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
    totals: dict[str, float] = {}
    for batch in self.task.eval_batches(sharding):
      batch = global_batch_lib.to_global(batch, self.mesh, self.rules,
                                         self.config.eval_batch_size)
      sums = jax.device_get(self._step(params, model_state, batch))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))
    return self.task.summarize_eval(totals)
