"""The diffusion task: loss, seeded sampling, training with sample metrics, --mode=sample/eval."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax import tasks
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.parallel import mesh as mesh_lib
from ascan_jax.tasks import denoising
from ascan_jax.tasks import diffusion
from ascan_jax.train import builder
from configs import imagenet256_diffusion
from tests import helpers


def _tiny_config():
  c = imagenet256_diffusion.get_config("runlocal")
  c.model.channels = (16, 32, 32)
  c.model.head_dim = 16
  c.model.context_dim = 16
  c.batch_size = 8
  c.sample.sampler = "ddim"
  c.sample.steps = 3
  c.mesh.shape = (1, 1, 1)
  return c


@pytest.fixture(scope="module")
def tiny():
  c = _tiny_config()
  task = tasks.get_task(c)
  setup = builder.build(task, c, 1000, mesh=mesh_lib.make_mesh(c, jax.devices()[:1]))
  return c, task, setup, builder.create_state(setup)


def test_space_to_depth_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  y = denoising.space_to_depth(x, 2)
  assert y.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(y[0, 0, 0, 3:6], x[0, 0, 1])  # patch (0, 1) -> channels 3..5
  np.testing.assert_array_equal(denoising.depth_to_space(y, 2), x)


def test_loss_and_per_timestep_buckets(tiny):
  _, task, _, state = tiny
  batch = task.synthetic_batch(8, jax.random.key(0))
  loss, (_, metrics) = jax.jit(task.loss_fn)(state.params, state.model_state, batch,
                                             jax.random.key(1))
  assert np.isfinite(float(loss))
  # The zero-initialised output layer predicts eps = 0 at first: the loss is E[eps^2] ~ 1.
  assert 0.7 < float(loss) < 1.3
  assert sorted(metrics) == sorted(f"train/loss_t{k}" for k in range(10))
  sums = jax.jit(task.eval_fn)(state.params, state.model_state, batch)
  assert float(sums["count"]) == 8 and np.isfinite(float(sums["loss"]))


def test_sampling_is_seeded_per_sample_and_batch_independent(tiny):
  _, task, setup, state = tiny
  # A non-zero output layer so samples depend on the model and the noise.
  params = jax.tree.map(lambda x: x + 0.01, state.params)
  labels = np.arange(8) % 10
  small = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params, 4)
  large = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params, 8)
  a = small(params, labels, seed=3)
  b = large(params, labels, seed=3)
  c = large(params, labels, seed=4)
  assert a.shape == (8, 32, 32, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)  # sample i does not depend on the batch it is drawn in.
  assert not np.array_equal(b, c)
  protocol = large.protocol(step=5, ema=True, num_samples=8, seed=3)
  assert protocol["nfe_per_sample"] == 6  # ddim, 3 steps, constant guidance: 2 passes a step.
  assert protocol["sampler"] == "ddim" and protocol["seed"] == 3
  assert protocol["guidance_scales"] == [3.0, 3.0, 3.0]
  assert large.tag(3, True) == "ddim3_constant3_seed3_ema"
  s = task.config.sample
  old = (s.guidance, s.end_step)
  s.guidance, s.end_step = "ramp", -1
  assert large.tag(0, False) == "ddim3_ramp1.1to3.6_steps5toend_seed0_raw"
  s.guidance, s.end_step = old


def test_guidance_kinds_and_config_errors():
  from ascan_jax import config_validation as cv
  c = _tiny_config()
  for kind in generate.GUIDANCE_KINDS:
    c.sample.guidance = kind
    diffusion.check_config(c)
  c.sample.guidance = "cfg++"
  with pytest.raises(cv.ConfigError, match="config.sample.guidance"):
    diffusion.check_config(c)
  c = _tiny_config()
  c.sample.sampler = "dpm3"
  with pytest.raises(cv.ConfigError, match="config.sample.sampler: 'dpm3'"):
    diffusion.check_config(c)
  c = _tiny_config()
  c.evals.samples.judge_dir = ""
  c.evals.samples.train_judge = False
  with pytest.raises(cv.ConfigError, match="config.evals.samples.num_samples"):
    diffusion.check_config(c)


def test_train_with_sample_metrics_then_sample_and_eval_modes(tmp_path):
  judge = tmp_path / "judge"
  helpers.run_main(*helpers.TINY_CLASSIFIER, f"--workdir={judge}", "--config.total_steps=20",
                   "--config.evals.val.every_steps=20")
  weights = helpers.random_inception_weights(tmp_path / "inception.safetensors")
  from ascan_jax.tools import compute_reference_stats
  from ascan_jax.data import sources
  real = sources.EmbeddedSource("embedded_mnist", "validation", 0.2)
  real_images = np.stack([np.repeat(np.pad(real.images[i], 2)[..., None], 3, -1)
                          for i in range(40)])
  np.savez(tmp_path / "real.npz", arr_0=real_images)
  reference = str(tmp_path / "reference.npz")
  compute_reference_stats.compute_reference(str(tmp_path / "real.npz"), weights, reference,
                                            batch_size=20, store_images=True, progress=False)
  run = tmp_path / "diffusion"
  common = [*helpers.TINY_DIFFUSION, f"--workdir={run}",
            f"--config.evals.samples.judge_dir={judge}", "--config.evals.samples.train_judge=False",
            "--config.evals.samples.num_samples=20",
            f"--config.evals.samples.inception_path={weights}",
            f"--config.evals.samples.reference_path={reference}"]
  helpers.run_main(*common, "--config.total_steps=6", "--config.evals.val.every_steps=6",
                   "--config.evals.samples.every_steps=6", "--config.evals.grid.every_steps=3",
                   "--config.checkpoint.every_steps=3")
  rows = helpers.read_jsonl(run / "metrics.jsonl")
  last = rows[-1]
  for key in ("eval/loss", "eval/ema_loss", "eval/sample_class_accuracy", "eval/fd_classifier",
              "eval/fid", "eval/sfid", "eval/inception_score", "eval/precision", "eval/recall"):
    assert key in last and np.isfinite(last[key]), key
  assert 0.0 <= last["eval/sample_class_accuracy"] <= 1.0
  assert "train/loss_t0" in rows[0]
  files = sorted(os.listdir(run / "samples"))
  tag = "ddim3_constant3_seed"
  assert f"grid_step0000003_{tag}0_ema.png" in files and f"grid_step0000006_{tag}0_ema.npz" in files
  assert last["eval/sample_protocol"] == f"samples/eval_step0000006_{tag}1_ema.json"
  assert last["eval/sample_nfe"] == 6
  protocol = json.loads((run / last["eval/sample_protocol"]).read_text())
  assert protocol["checkpoint_step"] == 6 and protocol["ema"] is True
  assert protocol["num_samples"] == 20 and len(protocol["reference_sha256"]) == 64
  assert protocol["metrics"]["eval/fid"] == last["eval/fid"]

  helpers.run_main(*common, "--mode=sample", "--config.sample.classes=(3,7)",
                   "--config.sample.per_class=3", "--config.sample.seed=11")
  out = np.load(run / "samples" / "sample_step0000006_ddim3_constant3_seed11_ema.npz")
  assert out["images"].shape == (6, 32, 32, 1)
  np.testing.assert_array_equal(out["labels"], [3, 3, 3, 7, 7, 7])
  meta = json.loads((run / "samples" / "sample_step0000006_ddim3_constant3_seed11_ema.json")
                    .read_text())
  assert meta["seed"] == 11 and meta["checkpoint_step"] == 6 and meta["nfe_per_sample"] == 6

  helpers.run_main(*common, "--mode=eval")
  evals = helpers.read_jsonl(run / "eval.jsonl")
  assert evals[-1]["step"] == 6
  assert evals[-1]["eval/sample_class_accuracy"] == last["eval/sample_class_accuracy"]


def test_chunks_stay_sharded_and_leading_rows_fetch_the_first_samples(tiny):
  _, task, setup, state = tiny
  params = jax.tree.map(lambda x: x + 0.01, state.params)
  labels = np.arange(7) % 10
  gen = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params, 4)
  chunks = list(gen.chunks(params, labels, seed=3))
  assert [(c.start, c.count) for c in chunks] == [(0, 4), (4, 3)]
  assert all(isinstance(c.images, jax.Array) and c.images.shape == (4, 32, 32, 1)
             for c in chunks)
  np.testing.assert_array_equal(np.asarray(chunks[1].labels)[:3], labels[4:])
  everything = gen(params, labels, seed=3)
  assert everything.shape == (7, 32, 32, 1)
  np.testing.assert_array_equal(generate.leading_rows(chunks[1].images, 2), everything[4:6])
  with pytest.raises(ValueError, match="cannot take 5 leading rows"):
    generate.leading_rows(chunks[0].images, 5)
  # Fewer samples than a batch: one call at their own batch (rounded up to the data-parallel
  # devices), not padded to the full 16; the samples are the same.
  big = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params, 16)
  b = -(-3 // setup.mesh.size) * setup.mesh.size
  few = list(big.chunks(params, labels[:3], seed=3))
  assert [(c.start, c.count, c.images.shape[0]) for c in few] == [(0, 3, b)]
  assert big.compiled_batch_sizes == (b,)
  np.testing.assert_array_equal(big(params, labels[:3], seed=3), everything[:3])


def test_judge_on_sharded_chunks_matches_the_host_path():
  """The judge's class accuracy and feature distance of samples split over 8 devices equal the
  host path's (``predict`` on one device, then numpy), and padding rows never count."""
  import flax.linen as nn
  from ascan_jax.eval import generative_metrics as gm
  from ascan_jax.tasks import judge as judge_lib
  from configs import ascan_t

  c = ascan_t.get_config("runlocal")
  c.model.layout, c.model.widths, c.model.stem_width = "C-CT-CT-CT", (16, 32, 64, 64), 16
  c.model.head_dim, c.model.embed_dim = 16, 64
  task = tasks.get_task(c)
  variables = nn.unbox(task.init_variables(jax.random.key(0)))
  judge = judge_lib.Judge(task, variables, step=0, workdir="random-judge")
  rng = np.random.default_rng(0)
  size = judge.image_size
  images = rng.integers(0, 256, size=(30, size, size, 1), dtype=np.uint8)
  real = rng.integers(0, 256, size=(40, size, size, 1), dtype=np.uint8)
  logits, feats = judge.predict(images, batch_size=40)
  predicted = np.argmax(logits, -1)
  labels = np.where(np.arange(30) % 2 == 0, predicted, (predicted + 1) % 10)  # half right
  real_features = judge.predict(real, batch_size=40)[1]
  want_fd = gm.frechet_distance(*gm.feature_statistics(feats),
                                *gm.feature_statistics(real_features))

  got = judge.evaluate(images, labels, real_features, batch_size=16)  # chunks of 16 and 14 (+2)
  assert got["sample_class_accuracy"] == 0.5
  assert got["fd_classifier"] == pytest.approx(want_fd, rel=1e-4)

  # Padding that the classifier would call correct is masked out.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("batch",)), P("batch"))
  stats = judge.start()
  for lo in (0, 16):
    n = min(16, 30 - lo)
    chunk = np.concatenate([images[lo:lo + n], images[:16 - n]])
    chunk_labels = np.concatenate([labels[lo:lo + n], predicted[:16 - n]])
    judge.add(stats, jax.device_put(chunk, sharding), jax.device_put(chunk_labels, sharding), n)
  assert (stats.correct, stats.count) == (15, 30)
  mu, sigma = stats.features.statistics()
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False),
                             rtol=1e-4, atol=1e-5 * np.abs(sigma).max())
  with pytest.raises(ValueError, match=r"expects \[N, 32, 32, C\] images"):
    judge.add(stats, jax.device_put(np.zeros((8, 16, 16, 1), np.uint8), sharding),
              jax.device_put(np.zeros(8, np.int32), sharding), 8)


def test_v_prediction_objective_and_its_denoiser():
  """``diffusion.prediction=v``: the training target is v (or, ``loss_on=epsilon``, the noise,
  compared with the eps the v implies) and ``denoiser`` turns v into eps. An oracle network that
  knows x0 and outputs the exact v has zero v loss (but not zero loss when read as eps), and
  zero held-out epsilon loss through ``denoiser``."""
  schedule = schedule_lib.NoiseSchedule(beta_end=0.02)
  x0 = jax.random.uniform(jax.random.key(0), (16, 4, 4, 3), minval=-1, maxval=1)
  mask = jnp.ones((16,))
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

  def oracle_v(x_t, t):
    a = jnp.sqrt(abar[t.astype(jnp.int32)])[:, None, None, None]
    b = jnp.sqrt(1 - abar[t.astype(jnp.int32)])[:, None, None, None]
    noise = (x_t - a * x0) / b
    return a * noise - b * x0

  keys = jax.random.split(jax.random.key(1))
  kw = dict(offset_noise=0.0, loss_buckets=10)
  v_loss, _ = denoising.train_loss(oracle_v, schedule, x0, mask, *keys, prediction="v", **kw)
  eps_loss, _ = denoising.train_loss(oracle_v, schedule, x0, mask, *keys, **kw)
  assert float(v_loss) < 1e-6 < 0.1 < float(eps_loss)
  # loss_on=epsilon: the eps implied by v + 0.1 misses the noise by sqrt(abar_t) * 0.1.
  off_loss, _ = denoising.train_loss(lambda x, t: oracle_v(x, t) + 0.1, schedule, x0, mask,
                                     *keys, prediction="v", loss_on="epsilon", **kw)
  t = schedule_lib.sample_timesteps(keys[0], 16, schedule.num_train_steps)
  np.testing.assert_allclose(float(off_loss), float(jnp.mean(abar[t] * 0.01)), rtol=1e-3)
  eps_fn = denoising.denoiser(oracle_v, schedule, "v")
  sums = denoising.eval_sums(eps_fn, schedule, x0, mask, loss_buckets=10)
  assert float(sums["loss"]) / float(sums["count"]) < 1e-5
  sums = denoising.eval_sums(oracle_v, schedule, x0, mask, loss_buckets=10)
  assert float(sums["loss"]) / float(sums["count"]) > 0.1


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_sampler_reads_the_prediction(tiny, prediction):
  """At initialisation the UNet outputs zeros (zero output layer): read as eps that is eps = 0,
  read as v it is eps = sqrt(1 - abar) x_t. The generator's images equal the sampler run by hand
  on that eps, with the generator's own noise and loop key."""
  _, _, setup, state = tiny
  c = _tiny_config()
  c.diffusion.prediction = prediction
  task = tasks.get_task(c)
  labels = np.arange(4) % 10
  images = generate.Generator(task, setup.mesh, setup.rules, setup.state_shardings.params,
                              4)(state.params, labels, seed=5)
  noise_key, loop_key = jax.random.split(jax.random.key(5))
  want = helpers.zero_network_samples(task, noise_key, loop_key, 4)
  assert np.abs(images.astype(int) - want.astype(int)).max() <= 1


def test_min_snr_gamma_weights_the_loss_but_not_the_per_tenth_metrics():
  """``diffusion.min_snr_gamma``: an eps error weighs ``min(SNR, gamma) / SNR`` (1 at high noise,
  small at low noise), a v error ``min(SNR, gamma) / (SNR + 1)``; 0 is the unweighted loss and
  ``train/loss_t<k>`` stay unweighted either way."""
  schedule = schedule_lib.NoiseSchedule(beta_end=0.02)
  x0 = jax.random.uniform(jax.random.key(0), (64, 4, 4, 3), minval=-1, maxval=1)
  mask = jnp.ones((64,))
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  keys = jax.random.split(jax.random.key(2))
  t = schedule_lib.sample_timesteps(keys[0], 64, schedule.num_train_steps)
  snr = abar[t] / (1 - abar[t])
  kw = dict(offset_noise=0.0, loss_buckets=10)

  def off_by_a_tenth(x_t, t):  # predicts eps (or v) of x0 = 0 plus 0.1: a known error.
    noise = (x_t - jnp.sqrt(abar[t.astype(jnp.int32)])[:, None, None, None] * x0) / jnp.sqrt(
        1 - abar[t.astype(jnp.int32)])[:, None, None, None]
    return noise + 0.1

  plain, plain_t = denoising.train_loss(off_by_a_tenth, schedule, x0, mask, *keys, **kw)
  weighted, weighted_t = denoising.train_loss(off_by_a_tenth, schedule, x0, mask, *keys,
                                              min_snr_gamma=5.0, **kw)
  np.testing.assert_allclose(float(plain), 0.01, rtol=1e-3)
  np.testing.assert_allclose(float(weighted), float(jnp.mean(0.01 * jnp.minimum(snr, 5.0) / snr)),
                             rtol=1e-3)
  assert float(weighted) < 0.95 * float(plain)
  # The lowest-noise tenth of the timesteps counts for little, the noisier ones fully.
  w = denoising.min_snr_weight(schedule, jnp.arange(1000), 5.0, on_v=False)
  assert float(jnp.mean(w[:100])) < 0.3 and float(jnp.min(w[300:])) == 1.0
  for k in plain_t:
    np.testing.assert_allclose(float(weighted_t[k]), float(plain_t[k]), rtol=1e-6)
  zero, _ = denoising.train_loss(off_by_a_tenth, schedule, x0, mask, *keys, min_snr_gamma=0.0,
                                 **kw)
  assert float(zero) == float(plain)
  # A v target: the same 0.1 error in v weighs min(SNR, gamma) / (SNR + 1).
  v_weighted, _ = denoising.train_loss(
      lambda x, t: schedule_lib.v_target(schedule, x0, t.astype(jnp.int32), off_by_a_tenth(x, t)
                                         - 0.1) + 0.1,
      schedule, x0, mask, *keys, prediction="v", min_snr_gamma=5.0, **kw)
  np.testing.assert_allclose(float(v_weighted),
                             float(jnp.mean(0.01 * jnp.minimum(snr, 5.0) / (snr + 1))), rtol=1e-3)
  from ascan_jax import config_validation as cv
  c = _tiny_config()
  c.diffusion.min_snr_gamma = -1.0
  with pytest.raises(cv.ConfigError, match="diffusion.min_snr_gamma"):
    diffusion.check_config(c)
