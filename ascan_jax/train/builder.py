"""Builds what a run trains with: durations, optimizer, sharded state, frozen weights, the step.

Shared by training, ``--mode=eval``/``sample``/``bench`` and the judge loader, so that every mode
uses exactly the state layout and the step that training uses.

* The state is created directly sharded: ``jax.eval_shape`` of the initialiser, shardings from
  the logical axis names and the mesh rules, then ``jit`` with those output shardings.
* Frozen weights (``Task.frozen_spec`` / ``load_frozen``) are loaded once, sharded by the same
  rules (``frozen_shardings``), and passed to the step as a separate, non-donated argument.
* The jitted step is ``train_step(state, frozen, batch) -> (state, metrics)`` with explicit
  in/out shardings and the state donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
  frozen: Any  # the frozen weights (sharded arrays), {} when the task has none.
  frozen_shardings: Any
  batch_shardings: Any
  train_step: Callable  # jitted: (state, frozen, batch) -> (state, metrics); state donated.
  host_fields: tuple[str, ...]


def load_frozen(task, mesh: Mesh, rules) -> tuple[Any, Any]:
  """``(frozen weights, their shardings)``: ``({}, {})`` when the task has none. Each array is
  created in its sharding by the task's loader; a loader that returns other shardings or shapes
  is refused."""
  spec = task.frozen_spec()
  if spec is None:
    return {}, {}
  shardings = sharding_lib.tree_shardings(spec, mesh, rules)
  frozen = task.load_frozen(shardings)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  expected = nn.unbox(spec)
  if jax.tree.structure(frozen) != jax.tree.structure(expected):
    raise ValueError(f"task {task.name!r}: load_frozen returned a tree that differs from "
                     "frozen_spec")
  for got, want, s in zip(jax.tree.leaves(frozen), jax.tree.leaves(expected),
                          jax.tree.leaves(shardings)):
    if got.shape != want.shape or not got.sharding.is_equivalent_to(s, got.ndim):
      raise ValueError(f"task {task.name!r}: a frozen array of shape {got.shape} came back "
                       f"with sharding {got.sharding}, expected shape {want.shape} and {s}")
  return frozen, shardings


def build(task, config, num_train_examples: int | None = None, mesh: Mesh | None = None,
          *, with_frozen: bool = True) -> Setup:
  """Everything a run needs; ``num_train_examples`` None leaves epoch-based durations
  unresolved (see ``optim.resolve_durations``)."""
  mesh = mesh or mesh_lib.make_mesh(config)
  rules = mesh_lib.rules(config)
  durations = optim.resolve_durations(config, num_train_examples)
  abstract_params = None
  if config.optim.groups or config.optim.layer_decay < 1.0:
    abstract_params = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
  tx, schedule = optim.make_optimizer(config.optim, durations, abstract_params,
                                      task.parameter_layer())
  init_fn = state_lib.make_init_fn(task.init_variables, tx, config.seed)
  abstract, shardings = state_lib.abstract_state_and_shardings(init_fn, mesh, rules)
  frozen, frozen_shardings = load_frozen(task, mesh, rules) if with_frozen else ({}, {})
  batch_shardings = sharding_lib.batch_shardings_for(task.input_spec(config.batch_size), mesh,
                                                     rules)
  step = step_lib.make_train_step(task.loss_fn, tx, schedule, preprocess=task.preprocess,
                                  microbatches=config.microbatches,
                                  ema_decay=config.optim.ema_decay,
                                  ema_warmup=config.optim.ema_warmup)
  replicated = NamedSharding(mesh, P())

  def step_in_mesh(state, frozen, batch):
    with sharding_lib.in_mesh(mesh, rules):
      return step(state, frozen, batch)

  jitted = jax.jit(step_in_mesh, in_shardings=(shardings, frozen_shardings, batch_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
  return Setup(mesh, rules, durations, tx, schedule, init_fn, abstract, shardings, frozen,
               frozen_shardings, batch_shardings, jitted,
               ("index",) + tuple(task.host_fields))


def create_state(setup: Setup):
  state, _ = state_lib.create_sharded_state(setup.init_fn, setup.mesh, setup.rules)
  return state


@dataclasses.dataclass
class RunContext:
  """A restored (or fresh) run: what ``Task.sample`` and ``Task.bench_extra`` work with."""
  setup: Setup
  state: Any
  step: int


class NoCheckpointError(FileNotFoundError):
  """A mode that needs a checkpoint found none (or not the requested step)."""


def best_settings(task, config) -> tuple[str, str]:
  """``(best metric, best mode)``: the config's, else the task's defaults."""
  metric = config.checkpoint.best_metric or task.default_metric
  mode = config.checkpoint.best_mode or task.default_metric_mode
  return metric, mode


def restore(task, config, workdir: str, step: int = -1, *, mesh: Mesh | None = None,
            num_train_examples: int | None = None) -> RunContext:
  """The checkpoint of ``step`` (-1: the latest) in ``workdir`` restored into a fresh setup.
  Needs no training data (durations only size a schedule)."""
  from ascan_jax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  metric, mode = best_settings(task, config)
  ckpt = checkpoint_lib.Checkpointer(workdir, config, best_metric=metric, best_mode=mode,
                                     read_only=True)
  try:
    steps = ckpt.all_steps()
    wanted = step if step >= 0 else (max(steps) if steps else None)
    if wanted is None:
      raise NoCheckpointError(f"no checkpoint in {ckpt.directory} (workdir {workdir}); train "
                              "there first, or pass the --workdir of a trained run")
    if wanted not in steps:
      raise NoCheckpointError(f"no checkpoint for step {wanted} in {ckpt.directory}; "
                              f"available: {steps}")
    setup = build(task, config, num_train_examples, mesh)
    state, _ = ckpt.restore(wanted, setup.abstract_state)
  finally:
    ckpt.close()
  return RunContext(setup, state, wanted)
