"""AdamW with a warm-up and a decay schedule, decoupled weight decay on kernels, parameter groups.

Schedule (``optim.schedule``): a linear warm-up from ``init_lr`` to ``peak_lr``, then
* ``cosine``: down to ``end_lr`` at the last step (the paper's ImageNet recipe: 5e-7 -> 3e-3 ->
  5e-6);
* ``linear``: a straight line to ``end_lr``;
* ``poly``: ``end_lr + (peak_lr - end_lr) * (1 - progress) ** poly_power`` (mmseg's segmentation
  schedule with power 1.0 and ``end_lr`` 0);
* ``constant``: ``peak_lr``.
Weight decay is applied to convolution and dense kernels only: not to norms, biases or the
relative-position tables. Gradients are clipped to a global norm of ``grad_clip_norm`` first.

Parameter groups (``optim.groups``: ``(regex, lr multiplier, weight-decay multiplier)``, first
match on the path ``a/b/kernel`` wins) and layer-wise learning-rate decay (``optim.layer_decay``
< 1; layer ``l`` of ``L`` gets ``layer_decay ** (L - l)``, where the task says which layer a
parameter is in) become one AdamW per distinct multiplier pair, combined with
``optax.multi_transform``. Without groups and layer decay it is a single AdamW (the optimizer
state keeps the structure it always had).
"""
from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Durations:
  """A run's length in optimizer steps, resolved from epochs or steps."""
  total_steps: int
  warmup_steps: int
  steps_per_epoch: float


def resolve_durations(config, num_train_examples: int | None) -> Durations:
  """``total_steps`` (> 0) wins over ``total_epochs``; ``warmup_steps`` (>= 0) over epochs.

  ``num_train_examples`` None (no training data at hand, e.g. ``--mode=sample`` on another
  machine): epoch-based durations are left unresolved (one step, NaN steps per epoch); they
  never change the shapes of the state, so restoring and evaluating are unaffected."""
  if num_train_examples is None:
    if config.total_steps > 0:
      total = int(config.total_steps)
      warmup = int(config.optim.warmup_steps) if config.optim.warmup_steps >= 0 else 0
      return Durations(total, min(warmup, total), math.nan)
    return Durations(1, 0, math.nan)
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


SCHEDULES = ("cosine", "constant", "linear", "poly")


def learning_rate_schedule(optim_config, durations: Durations) -> optax.Schedule:
  o = optim_config
  if o.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule {o.schedule!r} is not one of {SCHEDULES}")
  warmup = durations.warmup_steps
  decay = max(1, durations.total_steps - warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = o.init_lr + (o.peak_lr - o.init_lr) * step / max(1, warmup)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    if o.schedule == "cosine":
      after = o.end_lr + 0.5 * (o.peak_lr - o.end_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    elif o.schedule == "linear":
      after = o.peak_lr + (o.end_lr - o.peak_lr) * progress
    elif o.schedule == "poly":
      after = o.end_lr + (o.peak_lr - o.end_lr) * (1.0 - progress) ** o.poly_power
    else:
      after = jnp.full_like(progress, o.peak_lr)
    return jnp.where(step < warmup, warm, after)

  return schedule


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def path_string(path) -> str:
  """A tree path as ``a/b/kernel`` (the ``value`` of a logically-partitioned box dropped)."""
  names = [_key_name(p) for p in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def weight_decay_mask(params):
  """True for kernels (decayed), False for norms, biases and position tables."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_string(path).rsplit("/", 1)[-1] == "kernel", params)


def group_multipliers(params, groups=(), layer_of=None, layer_decay: float = 1.0):
  """A tree of ``(lr multiplier, weight-decay multiplier)`` per parameter.

  ``groups``: ``(regex, lr_mult, wd_mult)``, first ``re.search`` match on the path wins.
  ``layer_of(path) -> (layer, num_layers)``: with ``layer_decay`` < 1 the lr multiplier is also
  scaled by ``layer_decay ** (num_layers - layer)``.
  """
  compiled = [(re.compile(g[0]), float(g[1]), float(g[2])) for g in groups]

  def one(path, _):
    name = path_string(path)
    lr, wd = 1.0, 1.0
    for pattern, lr_mult, wd_mult in compiled:
      if pattern.search(name):
        lr, wd = lr_mult, wd_mult
        break
    if layer_decay < 1.0 and layer_of is not None:
      layer, num_layers = layer_of(name)
      lr *= layer_decay ** (num_layers - layer)
    return (lr, wd)

  return jax.tree_util.tree_map_with_path(one, params)


def _adamw(o, schedule, lr_mult: float = 1.0, wd_mult: float = 1.0):
  lr = schedule if lr_mult == 1.0 else (lambda step: lr_mult * schedule(step))
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay * wd_mult,
                     mask=weight_decay_mask)


def make_optimizer(optim_config, durations: Durations, params=None,
                   layer_of=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(transformation, schedule)``. ``params`` (any tree with the parameters' structure, e.g.
  abstract) is needed for groups and layer decay; ``layer_of`` for layer decay."""
  o = optim_config
  schedule = learning_rate_schedule(o, durations)
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  grouped = bool(o.groups) or o.layer_decay < 1.0
  if not grouped:
    parts.append(_adamw(o, schedule))
    return optax.chain(*parts), schedule
  if params is None:
    raise ValueError("optim.groups / optim.layer_decay need the parameter tree")
  if o.layer_decay < 1.0 and layer_of is None:
    raise ValueError("optim.layer_decay < 1 needs the task to say which layer a parameter is "
                     "in (Task.parameter_layer returned None)")
  # Labels of the unboxed tree: names without the boxes' ``value`` attribute, and a prefix of a
  # boxed tree too (``tx.init`` on boxed parameters masks whole boxes).
  multipliers = group_multipliers(nn.unbox(params), o.groups, layer_of, o.layer_decay)
  pairs = sorted(set(jax.tree.leaves(multipliers, is_leaf=lambda x: isinstance(x, tuple))))
  label_of = {pair: f"lr{pair[0]:g}_wd{pair[1]:g}" for pair in pairs}
  labels = jax.tree.map(lambda pair: label_of[pair], multipliers,
                        is_leaf=lambda x: isinstance(x, tuple))
  transforms = {label_of[pair]: _adamw(o, schedule, *pair) for pair in pairs}
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts), schedule
