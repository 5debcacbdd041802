"""The train state: everything a resumed run needs to continue bit-for-bit.

``step``, ``params``, ``model_state`` (mutable collections such as BatchNorm statistics),
``opt_state``, the EMA of params and model state, and the base ``rng`` (raw key data, so it
checkpoints as a plain uint32 array). Per-step randomness is ``fold_in(rng, step)``, so nothing
else needs saving. The state is created already sharded: ``abstract_state`` evaluates the
initialiser abstractly (no memory), shardings come from the logical axis names, and ``jit`` with
those output shardings materialises each shard on its own device.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ascan_jax.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  ema_params: Any
  ema_model_state: Any
  rng: jax.Array  # raw uint32 key data.

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def _split_variables(variables):
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def make_init_fn(init_variables: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 seed: int) -> Callable[[], TrainState]:
  """A function of no arguments that builds the (boxed) initial state."""
  def init():
    key = jax.random.key(seed)
    init_key, state_key = jax.random.split(key)
    params, model_state = _split_variables(init_variables(init_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), ema_params=params, ema_model_state=model_state,
                      rng=jax.random.key_data(state_key))
  return init


def abstract_state_and_shardings(init_fn, mesh, rules):
  """(unboxed abstract state, its shardings) without allocating anything."""
  boxed = jax.eval_shape(init_fn)
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(init_fn, mesh, rules) -> tuple[TrainState, Any]:
  """The initial state, each array created directly with its sharding; and the shardings."""
  _, shardings = abstract_state_and_shardings(init_fn, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
  return state, shardings


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))

