"""Classifier-free guidance (Ho & Salimans 2022) and the per-step scale schedules AsCAN uses.

``eps = eps_uncond + s_i * (eps_cond - eps_uncond)`` with a scale ``s_i`` per sampler step
``i = 1 .. N`` (1-indexed; the sampler passes the 0-based loop index ``i - 1``). AsCAN (arXiv
2411.04967, sec. 6) samples with a constant scale of 1.78, or with "sampled cfg": no guidance on
steps 1-4 and, on steps 5..30 of 30, a scale rising from 1.1 to 3.6. "Rising" is defined here as
linear in the step index over the active interval, ``s_i = 1.1 + 2.5 * (i - 5) / (30 - 5)``, so
1.1 at step 5, 1.2 at step 6, ..., 3.6 at step 30. Every evaluation inside one step (Heun's two)
uses that step's scale.

NFE: a step whose scale is 1 (or that is outside the active interval) needs only the conditional
pass and costs 1 network evaluation per example; a step with scale 0 needs only the
unconditional pass; any other scale needs both, which are batched into one call of the model
(cond and null condition concatenated along the batch) and count as 2. ``passes_per_step`` is
this table; the samplers multiply it by their evaluations per step.

The model-facing function is ``model_eps(x_t, t, cond) -> eps``: ``cond`` is any pytree with a
leading batch axis (class labels, text embeddings and masks ...). The caller provides the "null"
condition (e.g. a learned null class index); each leaf is broadcast to the matching cond leaf.
``drop_condition`` is the training side: it swaps in the null condition at a given rate.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PAPER_CONSTANT_SCALE = 1.78
COND, UNCOND, BOTH = 0, 1, 2  # which passes a step needs


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
  """Scale ``scale`` (rising linearly to ``scale_end`` if given) on steps start_step..end_step
  (1-indexed, inclusive; ``end_step=None`` is the last step); scale 1 (no guidance) elsewhere."""
  scale: float
  scale_end: float | None = None
  start_step: int = 1
  end_step: int | None = None

  def scales(self, steps: int) -> np.ndarray:
    """The scale of each step, float64 [steps]."""
    end = steps if self.end_step is None else self.end_step
    if not 1 <= self.start_step <= end <= steps:
      raise ValueError(f"guidance interval [{self.start_step}, {end}] does not fit in "
                       f"{steps} sampler steps")
    out = np.ones(steps, np.float64)
    i = np.arange(self.start_step, end + 1)
    if self.scale_end is None or end == self.start_step:
      out[i - 1] = self.scale
    else:
      frac = (i - self.start_step) / (end - self.start_step)
      out[i - 1] = self.scale + (self.scale_end - self.scale) * frac
    return out


def constant(scale: float = PAPER_CONSTANT_SCALE) -> GuidanceSchedule:
  return GuidanceSchedule(float(scale))


def interval(scale: float, start_step: int, end_step: int | None = None) -> GuidanceSchedule:
  return GuidanceSchedule(float(scale), None, start_step, end_step)


def ramp(scale_start: float, scale_end: float, start_step: int = 1,
         end_step: int | None = None) -> GuidanceSchedule:
  return GuidanceSchedule(float(scale_start), float(scale_end), start_step, end_step)


def paper_ramp() -> GuidanceSchedule:
  """AsCAN's "sampled cfg": off on steps 1-4, 1.1 -> 3.6 linearly on steps 5..N (N = 30)."""
  return ramp(1.1, 3.6, start_step=5, end_step=None)


@dataclasses.dataclass(frozen=True, eq=False)
class CFG:
  """What ``samplers.sample`` needs to guide: the scale schedule, the condition, the null one."""
  schedule: GuidanceSchedule
  cond: Any
  null_cond: Any


def cfg(schedule: GuidanceSchedule | float, cond: Any, null_cond: Any) -> CFG:
  return CFG(as_schedule(schedule), cond, null_cond)


def as_schedule(guidance) -> GuidanceSchedule | None:
  """None, a float (constant scale), a GuidanceSchedule or a CFG -> GuidanceSchedule or None."""
  if guidance is None or isinstance(guidance, GuidanceSchedule):
    return guidance
  if isinstance(guidance, CFG):
    return guidance.schedule
  if isinstance(guidance, (int, float)):
    return constant(guidance)
  raise TypeError(f"guidance must be None, a float, a GuidanceSchedule or a CFG; got {guidance!r}")


def scales_per_step(guidance, steps: int) -> np.ndarray:
  schedule = as_schedule(guidance)
  return np.ones(steps, np.float64) if schedule is None else schedule.scales(steps)


def modes_per_step(guidance, steps: int) -> np.ndarray:
  """COND where the scale is 1, UNCOND where it is 0, BOTH elsewhere (int [steps])."""
  s = scales_per_step(guidance, steps)
  return np.where(s == 1.0, COND, np.where(s == 0.0, UNCOND, BOTH)).astype(np.int32)


def passes_per_step(guidance, steps: int) -> np.ndarray:
  """Network evaluations per example for one denoiser call at each step: 1 or 2."""
  return np.where(modes_per_step(guidance, steps) == BOTH, 2, 1)


def combine(eps_cond: jax.Array, eps_uncond: jax.Array, scale) -> jax.Array:
  """``eps_uncond + scale * (eps_cond - eps_uncond)`` in float32."""
  eps_cond, eps_uncond = eps_cond.astype(jnp.float32), eps_uncond.astype(jnp.float32)
  return eps_uncond + scale * (eps_cond - eps_uncond)


def _concat(cond: Any, null_cond: Any) -> Any:
  def cat(c, n):
    c = jnp.asarray(c)
    return jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)], axis=0)
  return jax.tree.map(cat, cond, null_cond)


def _null_like(cond: Any, null_cond: Any) -> Any:
  return jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype),
                                                     jnp.shape(c)), cond, null_cond)


def drop_condition(key: jax.Array, cond: Any, null_cond: Any, rate: float) -> Any:
  """Training side of CFG: replaces each example's condition by the null one with prob. ``rate``."""
  leaves = jax.tree.leaves(cond)
  drop = jax.random.bernoulli(key, rate, (jnp.shape(leaves[0])[0],))

  def pick(c, n):
    c = jnp.asarray(c)
    mask = drop.reshape(drop.shape + (1,) * (c.ndim - 1))
    return jnp.where(mask, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), c)
  return jax.tree.map(pick, cond, null_cond)


def guided_eps(model_eps: Callable, cond: Any, null_cond: Any, scales) -> Callable:
  """A step-aware denoiser ``eps(x_t, t, step)`` (step: 0-based, may be traced) applying the
  per-step ``scales`` (float [steps], static). Steps needing one pass call the model on the batch;
  guided steps call it once on the doubled batch. Mixed schedules pick the branch with
  ``lax.switch``, so only the needed passes run."""
  scales = np.asarray(scales, np.float64)
  modes = np.where(scales == 1.0, COND, np.where(scales == 0.0, UNCOND, BOTH))
  present = sorted(set(modes.tolist()))
  branch_of_step = jnp.asarray([present.index(m) for m in modes], jnp.int32)
  scale_table = jnp.asarray(scales, jnp.float32)

  def run(mode, x_t, t, step):
    if mode == COND:
      return model_eps(x_t, t, cond).astype(jnp.float32)
    if mode == UNCOND:
      return model_eps(x_t, t, _null_like(cond, null_cond)).astype(jnp.float32)
    b = x_t.shape[0]
    both = model_eps(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), _concat(cond, null_cond))
    return combine(both[:b], both[b:], scale_table[step])

  def eps(x_t, t, step):
    if len(present) == 1:
      return run(present[0], x_t, t, step)
    branches = [lambda x, tt, s, m=m: run(m, x, tt, s) for m in present]
    return jax.lax.switch(branch_of_step[step], branches, x_t, t, step)

  return eps
