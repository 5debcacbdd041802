"""The generic jitted train step: preprocessing with frozen weights, gradients (accumulated over
micro-batches), the optimizer, EMA.

``step(state, frozen, batch) -> (state, metrics)``. The task supplies
``preprocess(frozen, batch, key, train) -> batch`` (on-device work with frozen weights: encode text
or images; its result is under ``stop_gradient``, so no gradient of the frozen weights is ever
formed) and ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, metrics))``;
everything else is task-independent. ``frozen`` is a separate argument of the step: it is not
part of the state, so it is never optimised, EMA-averaged, donated or checkpointed. Randomness is
``fold_in(state.rng, state.step)`` (and the micro-batch index), so a resumed run draws exactly the
same numbers.

Micro-batches take every ``microbatches``-th example (not contiguous chunks), so each one is
spread evenly over the data-parallel devices. Every micro-batch's forward pass starts from the
step's mutable state (BatchNorm running statistics), and the updated states are averaged over the
micro-batches: a running average ``m * r + (1 - m) * s_i`` then moves once per step, towards the
micro-batches' mean statistic, with momentum ``m`` whatever the accumulation factor (chaining
them would apply ``m ** microbatches``). Non-float leaves of the state take the last
micro-batch's value.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ascan_jax.train.state import TrainState

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[Any, dict]]]


def _split_microbatches(batch: dict, n: int) -> dict:
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _accumulate_state(total, new):
  """Micro-batch sum of a mutable-state leaf: floats add up (averaged after the scan), other
  leaves keep the newest value."""
  return total + new if _is_float(new) else new


def ema_update(ema, new, decay):
  if isinstance(decay, float) and decay <= 0.0:
    return new
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, new)


def ema_decay_at(step, decay: float, warmup: bool):
  """``decay``, or with ``warmup`` ``min(decay, (1 + step) / (10 + step))``: early in a run the
  EMA follows the weights closely instead of averaging in the untrained start."""
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


PREPROCESS_STREAM = 1 << 30  # fold_in constant of the preprocessing key (apart from the loss's).


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule,
                    *, preprocess=None, microbatches: int = 1, ema_decay: float = 0.0,
                    ema_warmup: bool = False):
  """``step(state, frozen, batch) -> (state, metrics)``, to be jitted by the caller."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen, batch: dict):
    key = jax.random.fold_in(state.key(), state.step)
    if preprocess is not None:
      batch = jax.lax.stop_gradient(
          preprocess(jax.lax.stop_gradient(frozen), batch,
                     jax.random.fold_in(key, PREPROCESS_STREAM), True))
    if microbatches == 1:
      (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, key)
    else:
      micro = _split_microbatches(batch, microbatches)

      def body(carry, xs):
        grad_sum, state_sum = carry
        index, mb = xs
        (loss, (model_state, metrics)), grads = grad_fn(
            state.params, state.model_state, mb, jax.random.fold_in(key, index))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        state_sum = jax.tree.map(_accumulate_state, state_sum, model_state)
        return (grad_sum, state_sum), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      state_zeros = jax.tree.map(
          lambda x: jnp.zeros_like(x) if _is_float(x) else x, state.model_state)
      (grads, state_sum), (losses, metrics) = jax.lax.scan(
          body, (zeros, state_zeros), (jnp.arange(microbatches), micro))
      grads = jax.tree.map(lambda g: g / microbatches, grads)
      model_state = jax.tree.map(
          lambda x: (x / microbatches).astype(x.dtype) if _is_float(x) else x, state_sum)
      loss = jnp.mean(losses)
      metrics = jax.tree.map(jnp.mean, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup) if ema_decay > 0 else 0.0
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
        ema_params=ema_update(state.ema_params, params, decay),
        ema_model_state=ema_update(state.ema_model_state, model_state, decay))
    metrics = dict(metrics)
    metrics["train/loss"] = loss
    metrics["train/lr"] = schedule(state.step)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    return new_state, metrics

  return step
