"""The DDPM noise schedule and the epsilon-prediction training helpers (AsCAN, arXiv 2411.04967).

AsCAN trains its class-conditional ImageNet models as DDPMs (Ho et al. 2020) with epsilon
prediction over 1000 steps and Stable Diffusion's *scaled-linear* betas,
``beta_i = (sqrt(b0) + i / (T - 1) * (sqrt(b1) - sqrt(b0)))**2`` for ``i = 0 .. T-1``. The paper
gives the final beta (0.01 at 256x256, 0.02 at 512 and above; see ``beta_end_for_resolution``)
but not the first one: we take Stable Diffusion's ``beta_start = 0.00085``. Offset noise (the
paper uses 0.05 in its multi-aspect phase) is a training-time option of ``sample_noise``.

``NoiseSchedule`` is a frozen, hashable dataclass whose tables are float64 numpy arrays derived
from its four fields, so it can be closed over or passed as a static argument to ``jax.jit``.

Fractional timesteps: samplers evaluate the model at non-integer ``t`` in ``[0, T-1]``. We
interpolate ``log sigma`` linearly between the integer training steps (``sigma = sqrt((1 - abar)
/ abar)``, as Karras et al. 2022 and diffusers' ``_sigma_to_t`` do) and set
``abar(t) = 1 / (1 + sigma(t)**2)``; at integer ``t`` this is the table value. Every sampler, and
the closed-form tests, use this one map (``sigma_at``, ``alpha_bar_at``, ``t_from_sigma``).

What the network predicts (``PREDICTIONS``): ``epsilon`` (the paper's) or ``v`` (Salimans & Ho
2022, arXiv 2202.00512: ``v = sqrt(abar) eps - sqrt(1 - abar) x0``, Stable Diffusion 2's
choice). ``v_target`` is the training target of ``v``; ``to_epsilon`` turns either prediction
into eps (``eps = sqrt(abar) v + sqrt(1 - abar) x_t``), so every sampler, guidance and the
held-out loss keep working in eps. At high noise a ``v`` network need not copy its input to
its output (eps is almost ``x_t`` there, which ``to_epsilon`` supplies), which a small pixel-space
network does badly (README, text-to-image runlocal).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("scaled_linear", "linear")
PREDICTIONS = ("epsilon", "v")


def beta_end_for_resolution(resolution: int) -> float:
  """The paper's final beta: 0.01 below 512x512, 0.02 at 512 and above."""
  return 0.02 if resolution >= 512 else 0.01


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Betas and everything derived from them; tables are float64 numpy arrays of length T."""
  num_train_steps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.01
  kind: str = "scaled_linear"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown beta schedule {self.kind!r}; valid: {', '.join(KINDS)}")
    if self.num_train_steps < 2 or not 0.0 < self.beta_start < self.beta_end < 1.0:
      raise ValueError(f"bad schedule {self}: need T >= 2 and 0 < beta_start < beta_end < 1")

  @functools.cached_property
  def betas(self) -> np.ndarray:
    if self.kind == "linear":
      return _frozen(np.linspace(self.beta_start, self.beta_end, self.num_train_steps))
    root = np.linspace(np.sqrt(self.beta_start), np.sqrt(self.beta_end), self.num_train_steps)
    return _frozen(root**2)

  @functools.cached_property
  def alphas(self) -> np.ndarray:
    return _frozen(1.0 - self.betas)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    return _frozen(np.cumprod(self.alphas))

  @functools.cached_property
  def sigmas(self) -> np.ndarray:
    """The VE noise level ``sqrt((1 - abar) / abar)``, increasing in t."""
    abar = self.alphas_cumprod
    return _frozen(np.sqrt((1.0 - abar) / abar))

  @functools.cached_property
  def log_sigmas(self) -> np.ndarray:
    return _frozen(np.log(self.sigmas))

  # --- fractional timesteps: log-sigma interpolation (numpy float64 for plans, jnp in jit) -----

  def sigma_at(self, t, xp=jnp):
    """sigma at (possibly fractional) timesteps t; ``xp=np`` gives float64 numpy."""
    steps = xp.arange(self.num_train_steps, dtype=xp.float32 if xp is jnp else xp.float64)
    log_sigmas = xp.asarray(self.log_sigmas, dtype=steps.dtype)
    return xp.exp(xp.interp(xp.asarray(t, steps.dtype), steps, log_sigmas))

  def alpha_bar_at(self, t, xp=jnp):
    """abar(t) = 1 / (1 + sigma(t)^2): the table value at integer t, interpolated in between."""
    return 1.0 / (1.0 + self.sigma_at(t, xp) ** 2)

  def t_from_sigma(self, sigma) -> np.ndarray:
    """The inverse of ``sigma_at`` (float64 numpy), clipped to [0, T-1]."""
    log_sigma = np.log(np.asarray(sigma, np.float64))
    return np.interp(log_sigma, self.log_sigmas, np.arange(self.num_train_steps, dtype=np.float64))


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape(v.shape[:1] + (1,) * (ndim - 1))


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; t is [batch], integer or fractional."""
  abar = _abar(schedule, t)
  a = _per_example(jnp.sqrt(abar), x0.ndim)
  b = _per_example(jnp.sqrt(1.0 - abar), x0.ndim)
  return (a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)).astype(x0.dtype)


def sample_noise(key: jax.Array, shape, offset_noise: float = 0.0, dtype=jnp.float32) -> jax.Array:
  """N(0, I) noise, plus ``offset_noise * N(0, 1)`` per example and channel (NHWC: broadcast over
  every axis but the first and last), so each channel's variance is ``1 + offset_noise**2``.
  ``offset_noise`` is a static Python float; it is meant for training only."""
  if offset_noise == 0.0:
    return jax.random.normal(key, shape, dtype)
  k_pixel, k_offset = jax.random.split(key)
  offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
  noise = jax.random.normal(k_pixel, shape, jnp.float32)
  noise = noise + offset_noise * jax.random.normal(k_offset, offset_shape, jnp.float32)
  return noise.astype(dtype)


def sample_timesteps(key: jax.Array, batch: int, num_train_steps: int = 1000) -> jax.Array:
  """Uniform integer training timesteps in [0, T), int32 [batch]."""
  return jax.random.randint(key, (batch,), 0, num_train_steps, dtype=jnp.int32)


class DiffusionTargets(NamedTuple):
  x_t: jax.Array    # the noisy input, x0's dtype
  t: jax.Array      # int32 [batch]
  noise: jax.Array  # the epsilon target, float32


def training_targets(schedule: NoiseSchedule, key: jax.Array, x0: jax.Array, *,
                     offset_noise: float = 0.0) -> DiffusionTargets:
  """Draws t and noise for clean inputs x0 (NHWC); returns the model's input and target."""
  k_t, k_noise = jax.random.split(key)
  t = sample_timesteps(k_t, x0.shape[0], schedule.num_train_steps)
  noise = sample_noise(k_noise, x0.shape, offset_noise, jnp.float32)
  return DiffusionTargets(q_sample(schedule, x0, t, noise), t, noise)


def _abar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    return jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
  return schedule.alpha_bar_at(t)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at timesteps ``t`` (float32)."""
  abar = _abar(schedule, t)
  return abar / (1.0 - abar)


def v_target(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` in float32 (module docstring)."""
  abar = _per_example(_abar(schedule, t), x0.ndim)
  return (jnp.sqrt(abar) * noise.astype(jnp.float32)
          - jnp.sqrt(1.0 - abar) * x0.astype(jnp.float32))


def to_epsilon(schedule: NoiseSchedule, prediction: str, out: jax.Array, x_t: jax.Array,
               t: jax.Array) -> jax.Array:
  """The network's output ``out`` at ``(x_t, t)`` as an eps prediction (float32)."""
  if prediction == "epsilon":
    return out.astype(jnp.float32)
  if prediction != "v":
    raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
  t = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
  abar = _per_example(_abar(schedule, t), x_t.ndim)
  return jnp.sqrt(abar) * out.astype(jnp.float32) + jnp.sqrt(1.0 - abar) * x_t.astype(
      jnp.float32)


def epsilon_loss(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
  """Per-example mean squared error in float32, shape [batch]."""
  err = jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def timestep_bucket(t: jax.Array, num_buckets: int = 10, num_train_steps: int = 1000) -> jax.Array:
  """Bucket ``floor(t * num_buckets / T)`` of each timestep (equal-width buckets), int32."""
  b = jnp.floor(jnp.asarray(t, jnp.float32) * (num_buckets / num_train_steps)).astype(jnp.int32)
  return jnp.clip(b, 0, num_buckets - 1)


def bucket_sums(t: jax.Array, values: jax.Array, num_buckets: int = 10,
                num_train_steps: int = 1000, weights: jax.Array | None = None):
  """Per-bucket sums of ``values`` (e.g. per-example losses) and counts, both float32
  [num_buckets]; jittable, and summable across steps/devices before dividing."""
  w = jnp.ones(values.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  idx = timestep_bucket(t, num_buckets, num_train_steps)
  sums = jax.ops.segment_sum(values.astype(jnp.float32) * w, idx, num_segments=num_buckets)
  counts = jax.ops.segment_sum(w, idx, num_segments=num_buckets)
  return sums, counts
