"""AdamW with linear warm-up and cosine decay, decoupled weight decay on kernels only, clipping.

The schedule rises linearly from ``init_lr`` to ``peak_lr`` over the warm-up, then follows a
cosine from ``peak_lr`` down to ``end_lr`` at the last step (the paper: 5e-7 -> 3e-3 -> 5e-6).
Weight decay is applied to convolution and dense kernels only: not to norms, biases or the
relative-position tables. Gradients are clipped to a global norm of ``grad_clip_norm`` first.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Durations:
  """A run's length in optimizer steps, resolved from epochs or steps."""
  total_steps: int
  warmup_steps: int
  steps_per_epoch: float


def resolve_durations(config, num_train_examples: int) -> Durations:
  """``total_steps`` (> 0) wins over ``total_epochs``; ``warmup_steps`` (>= 0) over epochs."""
  steps_per_epoch = num_train_examples / config.batch_size
  if config.total_steps > 0:
    total = int(config.total_steps)
  else:
    total = max(1, int(round(config.total_epochs * steps_per_epoch)))
  if config.optim.warmup_steps >= 0:
    warmup = int(config.optim.warmup_steps)
  else:
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  return Durations(total, min(warmup, total), steps_per_epoch)


def learning_rate_schedule(optim_config, durations: Durations) -> optax.Schedule:
  o = optim_config
  warmup = durations.warmup_steps
  decay = max(1, durations.total_steps - warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = o.init_lr + (o.peak_lr - o.init_lr) * step / max(1, warmup)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cosine = o.end_lr + 0.5 * (o.peak_lr - o.end_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def weight_decay_mask(params):
  """True for kernels (decayed), False for norms, biases and position tables."""
  def is_kernel(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", ""))
    if name == "value":  # a logically-partitioned box: look at its parameter name.
      prev = path[-2]
      name = getattr(prev, "key", getattr(prev, "name", ""))
    return name == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_config, durations: Durations) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  o = optim_config
  schedule = learning_rate_schedule(o, durations)
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*parts), schedule
