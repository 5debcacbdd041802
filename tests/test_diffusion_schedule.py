"""The DDPM schedule: scaled-linear betas, fractional timesteps, q_sample, offset noise, buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.diffusion import schedule as sl


@pytest.mark.parametrize("beta_end", [0.01, 0.012, 0.02])
def test_scaled_linear_betas_match_closed_form(beta_end):
  s = sl.NoiseSchedule(beta_end=beta_end)
  T, b0 = 1000, 0.00085
  i = np.arange(T)
  expected = (np.sqrt(b0) + i / (T - 1) * (np.sqrt(beta_end) - np.sqrt(b0))) ** 2
  np.testing.assert_allclose(s.betas, expected, rtol=1e-12)
  assert s.betas[0] == pytest.approx(b0, rel=1e-12)
  assert s.betas[-1] == pytest.approx(beta_end, rel=1e-12)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - expected), rtol=1e-12)
  assert np.all(np.diff(s.alphas_cumprod) < 0)
  assert 0 < s.alphas_cumprod[-1] < s.alphas_cumprod[0] < 1
  assert np.all(np.diff(s.sigmas) > 0)
  np.testing.assert_allclose(s.sigmas**2, (1 - s.alphas_cumprod) / s.alphas_cumprod, rtol=1e-12)
  assert not s.betas.flags.writeable


def test_defaults_resolution_rule_and_validation():
  s = sl.NoiseSchedule()
  assert (s.num_train_steps, s.beta_start, s.beta_end) == (1000, 0.00085, 0.01)
  assert s.kind == "scaled_linear"
  assert sl.beta_end_for_resolution(256) == 0.01 and sl.beta_end_for_resolution(512) == 0.02
  assert sl.beta_end_for_resolution(1024) == 0.02
  assert hash(s) == hash(sl.NoiseSchedule())  # usable as a static jit argument
  np.testing.assert_allclose(sl.NoiseSchedule(beta_start=1e-4, beta_end=0.02, kind="linear").betas,
                             np.linspace(1e-4, 0.02, 1000))
  with pytest.raises(ValueError, match="scaled_linear"):
    sl.NoiseSchedule(kind="cosine")
  with pytest.raises(ValueError):
    sl.NoiseSchedule(beta_start=0.02, beta_end=0.01)


def test_fractional_timesteps_interpolate_log_sigma():
  s = sl.NoiseSchedule()
  t_int = np.array([0, 1, 250, 998, 999])
  np.testing.assert_allclose(s.alpha_bar_at(jnp.asarray(t_int, jnp.float32)),
                             s.alphas_cumprod[t_int], rtol=1e-5)
  np.testing.assert_allclose(s.alpha_bar_at(t_int, np), s.alphas_cumprod[t_int], rtol=1e-12)
  # Halfway in t is the geometric mean in sigma.
  t = np.array([10.5, 500.5, 998.5])
  lo = t.astype(int)
  geometric_mean = np.sqrt(s.sigmas[lo] * s.sigmas[lo + 1])
  np.testing.assert_allclose(s.sigma_at(t, np), geometric_mean, rtol=1e-12)
  t = np.array([3.25, 123.4, 611.7, 998.9])
  np.testing.assert_allclose(s.t_from_sigma(s.sigma_at(t, np)), t, rtol=1e-10)
  jitted = jax.jit(s.alpha_bar_at)(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(jitted, s.alpha_bar_at(t, np), rtol=2e-5)


def test_alphas_cumprod_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012)
  ours = sl.NoiseSchedule(beta_end=0.012)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-5)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)


def test_q_sample_statistics_and_integer_float_agree():
  s = sl.NoiseSchedule()
  n, t0 = 20000, 300
  x0 = jnp.full((n, 2, 2, 1), 0.7, jnp.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = sl.q_sample(s, x0, jnp.full((n,), t0, jnp.int32), noise)
  abar = s.alphas_cumprod[t0]
  assert float(jnp.mean(x_t)) == pytest.approx(np.sqrt(abar) * 0.7, abs=0.01)
  assert float(jnp.var(x_t)) == pytest.approx(1 - abar, rel=0.02)
  x_t_float = sl.q_sample(s, x0, jnp.full((n,), t0, jnp.float32), noise)
  np.testing.assert_allclose(x_t_float, x_t, atol=1e-5)
  x_bf16 = sl.q_sample(s, x0.astype(jnp.bfloat16), jnp.zeros((n,), jnp.int32), noise)
  assert x_bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("offset", [0.05, 0.5])
def test_offset_noise_per_channel_variance(offset):
  shape = (8192, 4, 4, 3)
  noise = np.asarray(sl.sample_noise(jax.random.key(1), shape, offset_noise=offset), np.float64)
  per_channel_var = noise.reshape(-1, 3).var(0)
  np.testing.assert_allclose(per_channel_var, 1 + offset**2, rtol=0.02)
  # The offset is shared over H, W: each (example, channel) spatial mean has variance o^2 + 1/HW.
  means = noise.mean(axis=(1, 2))
  np.testing.assert_allclose(means.var(0), offset**2 + 1 / 16, rtol=0.1)
  assert abs(np.corrcoef(means.T)[0, 1]) < 0.1  # channels get independent offsets


def test_no_offset_is_plain_normal_and_training_targets():
  key = jax.random.key(2)
  np.testing.assert_array_equal(sl.sample_noise(key, (4, 3, 3, 2)),
                                jax.random.normal(key, (4, 3, 3, 2)))
  s = sl.NoiseSchedule()

  @jax.jit
  def check(key, x0):
    tgt = sl.training_targets(s, key, x0, offset_noise=0.05)
    return (tgt, sl.q_sample(s, x0, tgt.t, tgt.noise), sl.epsilon_loss(tgt.noise, tgt.noise),
            sl.epsilon_loss(tgt.noise + 2.0, tgt.noise), sl.sample_timesteps(key, 100000))

  x0 = np.asarray(np.random.default_rng(0).normal(size=(64, 4, 4, 3)), np.float32)
  tgt, x_t, zero, four, t = check(key, x0)
  assert tgt.t.dtype == jnp.int32 and tgt.t.shape == (64,)
  assert int(tgt.t.min()) >= 0 and int(tgt.t.max()) < 1000
  np.testing.assert_allclose(tgt.x_t, x_t, atol=1e-6)
  assert zero.shape == (64,) and float(zero.max()) == 0.0
  np.testing.assert_allclose(four, 4.0, rtol=1e-6)
  t = np.asarray(t)
  assert t.min() == 0 and t.max() == 999 and abs(t.mean() - 499.5) < 3


def test_bucket_sums():
  t = jnp.array([0, 99, 100, 999, 550, 551], jnp.int32)
  loss = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  sums, counts = jax.jit(sl.bucket_sums)(t, loss)
  expected_sums = np.zeros(10)
  expected_sums[[0, 1, 9, 5]] = [3.0, 3.0, 4.0, 11.0]
  expected_counts = np.zeros(10)
  expected_counts[[0, 1, 9, 5]] = [2, 1, 1, 2]
  np.testing.assert_allclose(sums, expected_sums)
  np.testing.assert_allclose(counts, expected_counts)
  np.testing.assert_array_equal(sl.timestep_bucket(jnp.array([0.0, 99.9, 100.0, 999.0]), 10),
                                [0, 0, 1, 9])
  sums, counts = sl.bucket_sums(t, loss, num_buckets=4, weights=jnp.array([1, 1, 0, 1, 1, 1]))
  np.testing.assert_allclose(counts, [2, 0, 2, 1])
  np.testing.assert_allclose(sums, [3, 0, 11, 4])


def test_v_prediction_target_and_its_epsilon():
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, eq. in §4); the exact v turned
  back into eps gives the noise at integer and fractional t, and x0 = sqrt(abar) x_t -
  sqrt(1 - abar) v."""
  s = sl.NoiseSchedule(beta_end=0.02)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (4, 6, 6, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  for t in (jnp.array([0, 250, 600, 999]), jnp.array([0.5, 250.25, 600.7, 998.9])):
    abar = np.asarray(s.alpha_bar_at(t, np) if t.dtype != jnp.int32 else s.alphas_cumprod[t])
    a = jnp.asarray(np.sqrt(abar), jnp.float32)[:, None, None, None]
    b = jnp.asarray(np.sqrt(1 - abar), jnp.float32)[:, None, None, None]
    v = sl.v_target(s, x0, t, noise)
    np.testing.assert_allclose(v, a * noise - b * x0, atol=1e-5)
    x_t = sl.q_sample(s, x0, t, noise)
    np.testing.assert_allclose(sl.to_epsilon(s, "v", v, x_t, t), noise, atol=1e-4)
    np.testing.assert_allclose(a * x_t - b * v, x0, atol=1e-4)
    np.testing.assert_array_equal(sl.to_epsilon(s, "epsilon", noise, x_t, t), noise)
  with pytest.raises(ValueError, match="prediction 'x0'"):
    sl.to_epsilon(s, "x0", v, x_t, t)
