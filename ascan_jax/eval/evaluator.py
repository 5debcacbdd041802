"""Evaluators: named, scheduled by config, run by the loop and by ``--mode=eval``.

Every evaluator has a ``name``, an ``every_steps`` and ``run(inputs) -> {metric: value}``, where
``inputs`` (``EvalInputs``) carries the parameter sets to evaluate (``raw`` and/or ``ema``, each
``(params, model_state)``), the frozen weights, the step and the workdir. Evaluators take
callables and data; they import neither ``train`` nor ``tasks`` (the task layer builds them).

``DatasetEvaluator`` sums a per-batch function over an evaluation stream:
* the function (``sum_fn(params, model_state, frozen, batch) -> {name: array}``, the task's
  preprocessing plus its ``eval_fn``) returns *sums* of any shape (a confusion matrix, per-class
  counts), computed with the padding mask, so adding them over batches, devices and processes
  counts every example exactly once;
* every requested parameter set is evaluated on the same batch in one jitted call, so the
  evaluation data is decoded once for raw and EMA parameters;
* integer sums accumulate on the device (exact); floating-point sums of each batch stay on the
  device until the end, when everything is fetched in one transfer and added in float64 in
  batch order. The host never waits for the device inside the loop.
Metrics are named ``<prefix><variant><metric>``: ``eval/top1`` (raw), ``eval/ema_top1`` (EMA).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ascan_jax.data import global_batch as global_batch_lib
from ascan_jax.parallel import sharding as sharding_lib

VARIANT_PREFIX = {"raw": "", "ema": "ema_"}


@dataclasses.dataclass
class EvalInputs:
  variants: dict  # "raw" / "ema" -> (params, model_state)
  frozen: Any
  step: int
  workdir: str


def variants_for(which: str) -> tuple[str, ...]:
  """``raw`` | ``ema`` | ``both`` -> the parameter sets to evaluate."""
  return {"raw": ("raw",), "ema": ("ema",), "both": ("raw", "ema")}[which]


class DatasetEvaluator:
  """Sums ``sum_fn`` over ``batches()``; see the module docstring."""

  def __init__(self, *, name: str, every_steps: int, prefix: str, params: str,
               batches: Callable[[], Iterable[dict]], sum_fn: Callable,
               summarize: Callable[[dict], dict], mesh, rules, param_shardings,
               model_state_shardings, frozen_shardings, batch_spec: dict, global_batch: int,
               host_fields: tuple[str, ...] = ()):
    self.name = name
    self.every_steps = int(every_steps)
    self.prefix = prefix
    self.which = variants_for(params)
    self._batches = batches
    self._summarize = summarize
    self.mesh, self.rules = mesh, rules
    self.global_batch = int(global_batch)
    self.host_fields = tuple(host_fields)
    batch_shardings = sharding_lib.batch_shardings_for(batch_spec, mesh, rules)
    variant_shardings = {v: (param_shardings, model_state_shardings) for v in self.which}

    def step(variants, frozen, batch):
      with sharding_lib.in_mesh(mesh, rules):
        return {v: sum_fn(p, s, frozen, batch) for v, (p, s) in variants.items()}

    replicated = NamedSharding(mesh, P())
    self._step = jax.jit(step, in_shardings=(variant_shardings, frozen_shardings,
                                             batch_shardings), out_shardings=replicated)
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def run(self, inputs: EvalInputs) -> dict:
    variants = {v: inputs.variants[v] for v in self.which}
    int_totals = None
    float_parts = []
    for batch in self._batches():
      device_batch = global_batch_lib.to_global(batch, self.mesh, self.rules, self.global_batch,
                                                self.host_fields)
      sums = self._step(variants, inputs.frozen, device_batch)
      ints = {v: {k: x for k, x in s.items() if jnp.issubdtype(x.dtype, jnp.integer)}
              for v, s in sums.items()}
      floats = {v: {k: x for k, x in s.items() if not jnp.issubdtype(x.dtype, jnp.integer)}
                for v, s in sums.items()}
      int_totals = ints if int_totals is None else self._add(int_totals, ints)
      float_parts.append(floats)
    if int_totals is None:
      raise ValueError(f"evaluator {self.name!r}: the evaluation data has no batches")
    int_totals, float_parts = jax.device_get((int_totals, float_parts))
    out = {}
    for v in self.which:
      totals = {k: np.asarray(x, np.int64) for k, x in int_totals[v].items()}
      for k in float_parts[0][v]:
        acc = np.zeros(np.shape(float_parts[0][v][k]), np.float64)
        for part in float_parts:
          acc = acc + np.asarray(part[v][k], np.float64)
        totals[k] = acc
      for metric, value in self._summarize(totals).items():
        out[f"{self.prefix}{VARIANT_PREFIX[v]}{metric}"] = value
    return out
