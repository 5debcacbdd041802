"""Builds what a run trains with: durations, optimizer, sharded state and the jitted step.

Shared by the loop and by ``--mode=bench`` so that the benchmark times exactly the step that
training runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.train import optim
from ascan_jax.train import state as state_lib
from ascan_jax.train import step as step_lib


@dataclasses.dataclass
class Setup:
  mesh: Mesh
  rules: Any
  durations: optim.Durations
  tx: Any
  schedule: Callable
  init_fn: Callable
  abstract_state: Any
  state_shardings: Any
  batch_shardings: Any
  train_step: Callable  # jitted: (state, batch) -> (state, metrics); the state is donated.


in_mesh = sharding_lib.in_mesh
batch_shardings_for = sharding_lib.batch_shardings_for


def build(task, config, num_train_examples: int, mesh: Mesh | None = None) -> Setup:
  mesh = mesh or mesh_lib.make_mesh(config)
  rules = mesh_lib.rules(config)
  durations = optim.resolve_durations(config, num_train_examples)
  tx, schedule = optim.make_optimizer(config.optim, durations)
  init_fn = state_lib.make_init_fn(task.init_variables, tx, config.seed)
  abstract, shardings = state_lib.abstract_state_and_shardings(init_fn, mesh, rules)
  batch_shardings = batch_shardings_for(task.input_spec(config.batch_size), mesh, rules)
  step = step_lib.make_train_step(task.loss_fn, tx, schedule, microbatches=config.microbatches,
                                  ema_decay=config.optim.ema_decay,
                                  ema_warmup=config.optim.ema_warmup)
  replicated = NamedSharding(mesh, P())

  def step_in_mesh(state, batch):
    with in_mesh(mesh, rules):
      return step(state, batch)

  jitted = jax.jit(step_in_mesh, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
  return Setup(mesh, rules, durations, tx, schedule, init_fn, abstract, shardings,
               batch_shardings, jitted)


def create_state(setup: Setup):
  state, _ = state_lib.create_sharded_state(setup.init_fn, setup.mesh, setup.rules)
  return state
