"""Classifier-free guidance: scale schedules, NFE accounting, batching, and a Gaussian check.

Gaussian check: cond data N(mu_c, s^2), uncond N(mu_u, s^2), equal s. Their exact predictors are
eps_y(x) = b (x - a mu_y) / V with the same V = a^2 s^2 + b^2, so the guided
eps_u + w (eps_c - eps_u) = b (x - a (mu_u + w (mu_c - mu_u))) / V is *exactly* the predictor of
N(mu_u + w (mu_c - mu_u), s^2): with a constant w every sampler targets that Gaussian. With a
per-step w the ODE is still linear; two runs from the same x_T differ by a sample-independent
shift along mu_c - mu_u, whose coefficient w_eff is a weighted average of the per-step scales.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.diffusion import guidance as g
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as sl

SCHED = sl.NoiseSchedule(beta_end=0.02)
MU_C = np.array([0.5, -0.3, 0.2, 0.0, 0.8, -0.6])
MU_U = np.array([0.1, 0.1, -0.2, 0.3, 0.0, 0.0])
S = 0.6
COND_LABEL, NULL_LABEL = 3, 10


def gaussian_model(record=None):
  """model_eps(x_t, t, labels): N(MU_C, S^2) for COND_LABEL, N(MU_U, S^2) for the null label."""
  def model_eps(x_t, t, labels):
    if record is not None:
      jax.debug.callback(lambda n, nulls: record.append((int(n), int(nulls))), x_t.shape[0],
                         jnp.sum(labels == NULL_LABEL), ordered=True)
    mu = jnp.where((labels == COND_LABEL)[:, None], jnp.asarray(MU_C, jnp.float32),
                   jnp.asarray(MU_U, jnp.float32))
    abar = SCHED.alpha_bar_at(t)[:, None]
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * S**2 + 1 - abar)
  return model_eps


def _guided_fn(schedule, sampler, steps, n, record):
  labels = jnp.full((n,), COND_LABEL, jnp.int32)
  guide = g.cfg(schedule, labels, NULL_LABEL)
  return jax.jit(lambda k: samplers.sample(gaussian_model(record), (n, 6), k, sampler=sampler,
                                           steps=steps, schedule=SCHED, guidance=guide)[0])


_cached_guided_fn = functools.lru_cache(maxsize=None)(
    lambda schedule, sampler, steps, n: _guided_fn(schedule, sampler, steps, n, None))


def guided_sample(schedule, sampler="heun", steps=30, n=2048, key=0, record=None):
  fn = (_guided_fn(schedule, sampler, steps, n, record) if record is not None
        else _cached_guided_fn(schedule, sampler, steps, n))
  return np.asarray(fn(jax.random.key(key)), np.float64)


def test_constant_and_interval_scales():
  np.testing.assert_array_equal(g.constant().scales(30), np.full(30, 1.78))
  np.testing.assert_array_equal(g.interval(2.0, 3, 7).scales(10), [1, 1, 2, 2, 2, 2, 2, 1, 1, 1])
  np.testing.assert_array_equal(g.interval(2.0, 8).scales(10), [1] * 7 + [2] * 3)
  np.testing.assert_array_equal(g.scales_per_step(None, 4), np.ones(4))
  np.testing.assert_array_equal(g.scales_per_step(2.5, 3), [2.5] * 3)
  with pytest.raises(ValueError, match="does not fit"):
    g.interval(2.0, 5, 31).scales(30)
  with pytest.raises(ValueError, match="does not fit"):
    g.paper_ramp().scales(4)


def test_paper_ramp_values():
  s = g.paper_ramp().scales(30)
  np.testing.assert_array_equal(s[:4], 1.0)  # steps 1-4: no guidance
  assert s[4] == pytest.approx(1.1) and s[5] == pytest.approx(1.2) and s[29] == pytest.approx(3.6)
  np.testing.assert_allclose(np.diff(s[4:]), 0.1)  # linear in the step index on steps 5..30
  np.testing.assert_array_equal(g.passes_per_step(g.paper_ramp(), 30), [1] * 4 + [2] * 26)
  np.testing.assert_allclose(g.ramp(1.0, 2.0, 2, 4).scales(5), [1, 1, 1.5, 2, 1])


def test_nfe_accounting():
  assert samplers.nfe("heun", 30) == 59
  assert samplers.nfe("heun", 30, g.paper_ramp()) == 4 * 2 + 25 * 4 + 2  # = 110
  assert samplers.nfe("heun", 30, g.constant(1.78)) == 118
  assert samplers.nfe("heun", 30, 1.78) == 118
  assert samplers.nfe("heun", 30, g.constant(1.0)) == 59  # scale 1: conditional pass only
  assert samplers.nfe("ddim", 50, g.interval(2.0, 10, 20)) == 50 + 11
  assert samplers.nfe("ddim", 50, g.interval(0.0, 1, 10)) == 50  # scale 0: unconditional only
  assert samplers.nfe("dpmpp_2m", 25, g.paper_ramp()) == 4 + 2 * 21
  assert samplers.nfe("ddpm", None, g.constant()) == 500


@pytest.mark.parametrize("sampler,steps,schedule", [
    ("heun", 30, g.paper_ramp()), ("ddim", 12, g.interval(0.0, 1, 3)),
    ("euler", 6, g.constant(2.0)), ("dpmpp_2m", 8, g.constant(1.0))])
def test_guided_calls_are_counted_and_batched(sampler, steps, schedule):
  record = []
  guided_sample(schedule, sampler, steps, n=4, record=record)
  passes = g.passes_per_step(schedule, steps)
  evals = samplers.get_sampler(sampler).evals_per_step(steps)
  assert len(record) == evals.sum()  # one model call per evaluation, cond+uncond batched
  assert sum(n for n, _ in record) // 4 == samplers.nfe(sampler, steps, schedule)
  modes = g.modes_per_step(schedule, steps)
  expected = [(4 * p, 4 * (p - 1) + 4 * int(m == g.UNCOND))
              for p, m, e in zip(passes, modes, evals) for _ in range(e)]
  assert record == expected  # batch size and how many null labels the model saw, call by call


def test_pytree_condition_and_null_broadcast():
  seen = {}

  def model_eps(x_t, t, cond):
    seen.update(cond)
    return x_t * jnp.where(cond["label"] == NULL_LABEL, 1.0, 3.0)[:, None]

  cond = {"label": jnp.array([1, 2], jnp.int32), "emb": jnp.ones((2, 5, 3))}
  null = {"label": NULL_LABEL, "emb": jnp.zeros((1, 5, 3))}
  x, t = jnp.ones((2, 4)), jnp.zeros((2,))
  eps = g.guided_eps(model_eps, cond, null, [2.0, 2.0])  # every step guided: one direct call
  np.testing.assert_allclose(eps(x, t, 1), 1.0 + 2.0 * (3.0 - 1.0))  # uncond + 2 (cond - uncond)
  np.testing.assert_array_equal(seen["label"], [1, 2, NULL_LABEL, NULL_LABEL])
  np.testing.assert_array_equal(seen["emb"][:2], 1.0)
  np.testing.assert_array_equal(seen["emb"][2:], 0.0)
  assert seen["emb"].shape == (4, 5, 3)
  mixed = jax.jit(g.guided_eps(model_eps, cond, null, [1.0, 2.0, 0.0]))
  np.testing.assert_allclose(mixed(x, t, jnp.int32(0)), 3.0)  # scale 1: cond only
  np.testing.assert_allclose(mixed(x, t, jnp.int32(1)), 5.0)
  np.testing.assert_allclose(mixed(x, t, jnp.int32(2)), 1.0)  # scale 0: uncond only
  np.testing.assert_allclose(g.combine(jnp.ones(3), jnp.zeros(3), 1.78), 1.78)
  big = {"label": jnp.arange(4000, dtype=jnp.int32) % 7, "emb": jnp.ones((4000, 2))}
  dropped = g.drop_condition(jax.random.key(0), big, {"label": NULL_LABEL, "emb": 0.0}, 0.1)
  is_null = np.asarray(dropped["label"]) == NULL_LABEL
  assert 0.08 < is_null.mean() < 0.12
  np.testing.assert_array_equal(np.asarray(dropped["emb"])[:, 0], np.where(is_null, 0.0, 1.0))


def _ideal(mu, n, key, steps, name="heun"):
  x_T = np.asarray(samplers.initial_noise(jax.random.key(key), (n, 6))[0], np.float64)
  plan = samplers.make_plan(SCHED, steps, samplers.get_sampler(name).default_spacing)
  hi, lo = plan.sigma[0], plan.sigma[-2]
  return mu + S**2 * (x_T * np.sqrt(1 + hi**2) - mu) / np.sqrt((S**2 + lo**2) * (S**2 + hi**2))


@pytest.mark.parametrize("sampler,steps,w", [("heun", 30, 1.78), ("heun", 30, 3.0),
                                             ("dpmpp_2m", 25, 1.78)])
def test_constant_guidance_targets_the_extrapolated_gaussian(sampler, steps, w):
  n = 4096
  x = guided_sample(g.constant(w), sampler, steps, n=n)
  mu_w = MU_U + w * (MU_C - MU_U)
  atol, ref = (0.1 if sampler == "dpmpp_2m" else 0.03), _ideal(mu_w, n, 0, steps, sampler)
  print(f"{sampler} w={w}: max |x - ideal| {np.abs(x - ref).max():.4f}, mean err "
        f"{np.abs(x.mean(0) - mu_w).max():.4f}, std rel err {np.abs(x.std(0) / S - 1).max():.4f}")
  np.testing.assert_allclose(x, ref, atol=atol)
  assert np.all(np.abs(x.mean(0) - mu_w) < 4.5 * S / np.sqrt(n) + 0.02 * np.abs(mu_w) + 0.003)
  assert np.all(np.abs(x.std(0) / S - 1) < 4.5 / np.sqrt(2 * n) + 0.03)


def _ddim_reference(scales, steps, n, key):
  """DDIM (eta = 0) in float64 numpy with the guided Gaussian predictor, step i using scales[i]."""
  plan = samplers.make_plan(SCHED, steps, "linspace")
  x = np.asarray(samplers.initial_noise(jax.random.key(key), (n, 6))[0], np.float64)
  for i in range(steps):
    ab, ab_s = plan.abar[i], plan.abar[i + 1]
    mu = MU_U + scales[i] * (MU_C - MU_U)
    eps = np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * S**2 + 1 - ab)
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    x = np.sqrt(ab_s) * x0 + np.sqrt(1 - ab_s) * eps
  return x


def test_ramp_guidance_matches_reference_step_by_step():
  scales = g.paper_ramp().scales(30)
  x = guided_sample(g.paper_ramp(), "ddim", 30, n=256)
  np.testing.assert_allclose(x, _ddim_reference(scales, 30, 256, 0), atol=2e-4)
  shifted = np.roll(scales, 1)  # an off-by-one in the step index would be caught
  assert np.abs(_ddim_reference(shifted, 30, 256, 0) - x).max() > 1e-3


def test_ramp_moves_the_mean_along_the_guidance_direction_monotonically():
  n, delta = 256, MU_C - MU_U
  base = guided_sample(g.constant(0.0), "heun", 30, n=n)  # unconditional only
  w_eff = []
  for end in (2.0, 3.6, 5.0):
    shift = (guided_sample(g.ramp(1.1, end, 5), "heun", 30, n=n) - base)
    coef = shift[:, delta != 0] / delta[delta != 0]
    np.testing.assert_allclose(coef, coef.mean(), atol=1e-3)  # parallel to mu_c - mu_u, per sample
    np.testing.assert_allclose(shift[:, delta == 0], 0.0, atol=1e-4)
    w_eff.append(coef.mean())
  print(f"ramp 1.1 -> (2.0, 3.6, 5.0) on steps 5..30: effective scale {np.round(w_eff, 4)}")
  assert 1.1 < w_eff[0] < w_eff[1] < w_eff[2] < 5.0, w_eff
  assert w_eff[1] < 3.6
