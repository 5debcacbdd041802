"""Generative metrics: FID vs pytorch-fid, IS and precision/recall limits, reference files.

Only the pytorch-fid comparison needs torch (skipped without it); the reference-statistics
tool is run end to end on random Inception weights written straight to safetensors.
"""
import hashlib

import numpy as np
import pytest

from tests import helpers
from tests import torch_reference

from ascan_jax.eval import generative_metrics as gm

def _pytorch_fid_frechet():
  """pytorch-fid's ``calculate_frechet_distance`` (skips the test without the torch stack)."""
  torch_reference.import_torch()
  fid_score = pytest.importorskip("pytorch_fid.fid_score")
  return fid_score.calculate_frechet_distance


def _features(rng, n, d, shift=0.0, scale=1.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(np.float32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid's sqrtm(disp=False)
def test_fid_matches_pytorch_fid():
  reference = _pytorch_fid_frechet()
  rng = np.random.default_rng(0)
  cases = {
      "well-conditioned": (_features(rng, 500, 64), _features(rng, 400, 64, 0.3, 1.2)),
      "near-singular (N < D)": (_features(rng, 40, 64), _features(rng, 30, 64, 0.1, 0.9)),
  }
  for name, (a, b) in cases.items():
    (mu1, s1), (mu2, s2) = gm.feature_statistics(a), gm.feature_statistics(b)
    ours = gm.frechet_distance(mu1, s1, mu2, s2)
    theirs = float(reference(mu1, s1, mu2, s2))
    assert abs(ours - theirs) < 1e-3, (name, ours, theirs)
    assert ours == pytest.approx(gm.fid_from_features(a, b))
  a, _ = cases["well-conditioned"]
  assert abs(gm.fid_from_features(a, a)) < 1e-6
  assert abs(gm.sfid_from_features(a, a.copy())) < 1e-6


def test_frechet_eps_fallback_and_imaginary_check(monkeypatch):
  rng = np.random.default_rng(1)
  mu1, s1 = gm.feature_statistics(_features(rng, 200, 16))
  mu2, s2 = gm.feature_statistics(_features(rng, 200, 16, 0.5))
  exact = gm.frechet_distance(mu1, s1, mu2, s2)
  real_sqrtm = gm._sqrtm  # pylint: disable=protected-access
  calls = []

  def flaky_sqrtm(a):  # the first (unregularised) product "fails" as a singular one would.
    calls.append(a)
    return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(gm, "_sqrtm", flaky_sqrtm)
  regularised = gm.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(16)) @ (s2 + 1e-6 * np.eye(16)))
  assert regularised == pytest.approx(exact, abs=1e-3)

  monkeypatch.setattr(gm, "_sqrtm", lambda a: real_sqrtm(a) + 0.5j * np.eye(len(a)))
  with pytest.raises(ValueError, match="imaginary"):
    gm.frechet_distance(mu1, s1, mu2, s2)
  monkeypatch.setattr(gm, "_sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
  assert gm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact)


def _improved_gan_is(probs, splits):
  scores = []
  for i in range(splits):
    part = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score():
  mean, std = gm.inception_score(np.zeros((100, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  k = 10
  labels = np.arange(1000) % k  # every split of 100 holds each class 10 times
  confident = np.where(np.arange(1008)[None] == labels[:, None], 1e4, 0.0)
  mean, std = gm.inception_score(confident)
  assert mean == pytest.approx(k, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  mean, _ = gm.inception_score(confident, split_size=500)  # ADM's chunking
  assert mean == pytest.approx(k, abs=1e-9)

  logits = np.random.default_rng(0).normal(size=(250, 1008)) * 3
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(gm.inception_score(logits, 10), _improved_gan_is(probs, 10),
                             rtol=1e-10)


def _brute_force_pr(ref, smp, k=3):
  def d2(u, v):
    return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
  r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
  d = d2(ref, smp)
  return np.mean(np.any(d <= r_ref[:, None], 0)), np.mean(np.any(d <= r_smp[None, :], 1))


def test_precision_recall():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(60, 8)).astype(np.float32)
  assert gm.precision_recall(ref, ref.copy()) == (1.0, 1.0)
  assert gm.precision_recall(ref, ref + 1000.0) == (0.0, 0.0)
  # Partly overlapping sets; small blocks exercise the batched k-NN and membership passes.
  smp = (rng.normal(size=(45, 8)) * 1.5 + 0.7).astype(np.float32)
  expected = _brute_force_pr(ref, smp)
  assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
  assert gm.precision_recall(ref, smp, batch_size=7) == pytest.approx(expected)
  assert gm.precision_recall(ref, smp) == pytest.approx(expected)
  assert gm.precision_recall(ref, smp, batch_size=16, backend="jax") == pytest.approx(expected)
  np.testing.assert_allclose(gm.manifold_radii(ref, 3, batch_size=13),
                             np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3],
                             rtol=1e-4, atol=1e-4)


def _random_stats(rng, pool_dim=gm.POOL_DIM, spatial_dim=gm.SPATIAL_DIM):
  return gm.ReferenceStats(rng.normal(size=pool_dim), np.eye(pool_dim) * 2.0,
                           rng.normal(size=spatial_dim), np.eye(spatial_dim) * 3.0)


def test_reference_round_trip_and_validation(tmp_path):
  rng = np.random.default_rng(0)
  stats = _random_stats(rng)
  stats.images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
  path = str(tmp_path / "ref.npz")
  gm.save_reference(path, stats)
  with np.load(path) as raw:  # what ADM's evaluator reads
    assert set(raw.files) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0"}
    assert raw["sigma"].dtype == np.float64
  loaded = gm.load_reference(path, load_images=True)
  for key in ("mu", "sigma", "mu_s", "sigma_s", "images"):
    np.testing.assert_array_equal(getattr(loaded, key), getattr(stats, key))
  assert gm.load_reference(path).images is None
  batches = list(gm.iter_npz_images(path, 2))
  assert [len(b) for b in batches] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(batches), stats.images)
  with open(path, "rb") as f:
    assert gm.file_sha256(path) == hashlib.sha256(f.read()).hexdigest()

  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mu=np.zeros(1000), sigma=stats.sigma, mu_s=stats.mu_s)
  with pytest.raises(ValueError) as e:
    gm.load_reference(bad)
  assert "mu has shape (1000,), expected (2048,)" in str(e.value)
  assert "missing key 'sigma_s' (expected shape (2023, 2023))" in str(e.value)
  with pytest.raises(ValueError, match="no 'arr_0'"):
    gm.load_reference(str(tmp_path / "bad.npz"), load_images=True)
  with pytest.raises(ValueError, match=r"mu_s has shape \(7,\), expected \(2023,\)"):
    gm.save_reference(str(tmp_path / "x.npz"), gm.ReferenceStats(
        stats.mu, stats.sigma, np.zeros(7), stats.sigma_s))

  # FID against stored statistics is the plain Fréchet distance.
  small = _random_stats(rng, 4, 3)
  feats = rng.normal(size=(50, 4))
  assert small.fid(feats) == pytest.approx(
      gm.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), small.mu, small.sigma))


def test_compute_reference_stats_tool(tmp_path):
  """End to end on random weights: .npz of uint8 images -> ADM-format statistics."""
  from ascan_jax.models import inception
  from ascan_jax.tools import compute_reference_stats as tool

  rng = np.random.default_rng(0)
  weights = helpers.random_inception_weights(tmp_path / "w.safetensors")
  images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
  src = str(tmp_path / "images.npz")
  np.savez(src, arr_0=images)
  out = str(tmp_path / "ref.npz")
  stats = tool.compute_reference(src, weights, out, batch_size=4, store_images=True,
                                 progress=False)
  loaded = gm.load_reference(out, load_images=True)
  np.testing.assert_array_equal(loaded.images, images)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  fn = inception.make_feature_fn(inception.load_params(weights))
  padded = np.concatenate([images[4:], np.zeros((3, 32, 32, 3), np.uint8)])  # same shape
  pool = np.concatenate([np.asarray(fn(images[:4])["pool"]), np.asarray(fn(padded)["pool"])[:1]])
  spatial = np.concatenate([np.asarray(fn(images[:4])["spatial"]),
                            np.asarray(fn(padded)["spatial"])[:1]])
  np.testing.assert_allclose(loaded.mu, pool.mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loaded.sigma_s, np.cov(spatial.astype(np.float64), rowvar=False),
                             rtol=1e-6, atol=1e-9)
  assert loaded.mu.shape == (2048,) and loaded.sigma_s.shape == (2023, 2023)
  assert np.std(pool, axis=0).max() > 0  # the random images give distinct features


def _pool_like(rng, n, d):
  """Non-negative, correlated features whose mean is larger than their spread, as Inception's
  pool features are (average-pooled ReLUs): the case where raw sums lose digits."""
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return (np.abs(rng.normal(size=(n, d)) @ mix) * 0.4 + 1.5).astype(np.float32)


def test_streamed_moments_match_numpy_on_the_same_features():
  """Per-chunk centred float32 moments on 8 devices, merged in float64, equal np.cov of the
  same features; the masked padding rows never count."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  rng = np.random.default_rng(0)
  features = _pool_like(rng, 1000, 96)
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  rows = 128  # 7 full chunks and one of 104 rows padded with junk.
  moments = jax.jit(gm.masked_moments, out_shardings=NamedSharding(mesh, P()))
  accumulator = gm.MomentAccumulator()
  for lo in range(0, len(features), rows):
    chunk = features[lo:lo + rows]
    n = len(chunk)
    chunk = np.concatenate([chunk, np.full((rows - n, chunk.shape[1]), 1e4, np.float32)])
    mean, m2 = moments(jax.device_put(chunk, NamedSharding(mesh, P("batch"))), np.int32(n))
    accumulator.add(n, mean, m2)
  assert accumulator.count == 1000
  mu, sigma = accumulator.statistics()
  ref_mu, ref_sigma = gm.feature_statistics(features)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-6)
  scale = np.sqrt(np.outer(np.diag(ref_sigma), np.diag(ref_sigma)))  # error vs the spread
  assert np.max(np.abs(sigma - ref_sigma) / scale) < 1e-5
  other = gm.feature_statistics(_pool_like(rng, 800, 96) * 1.05)
  assert gm.frechet_distance(mu, sigma, *other) == pytest.approx(
      gm.frechet_distance(ref_mu, ref_sigma, *other), rel=1e-5)

  # Host chunks of uneven sizes merge to the same numbers as one pass.
  host = gm.MomentAccumulator()
  for lo, hi in ((0, 1), (1, 333), (333, 1000)):
    host.add_features(features[lo:hi])
  np.testing.assert_allclose(host.statistics()[1], ref_sigma, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="at least 2 feature vectors"):
    gm.MomentAccumulator().statistics()


def test_inception_score_in_chunks_equals_one_pass():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(103, 50)) * 4
  for kwargs in ({"num_splits": 10}, {"split_size": 40}):
    accumulator = gm.InceptionScoreAccumulator(len(logits), **kwargs)
    for lo, hi in ((0, 7), (7, 60), (60, 103)):  # chunks that straddle the splits
      accumulator.add(logits[lo:hi])
    np.testing.assert_allclose(accumulator.result(), gm.inception_score(logits, **kwargs),
                               rtol=1e-12)
  accumulator = gm.InceptionScoreAccumulator(10, num_splits=2)
  accumulator.add(logits[:6])
  with pytest.raises(ValueError, match="needs 10 rows of logits, got 6"):
    accumulator.result()
  with pytest.raises(ValueError, match="12 rows of logits given"):
    accumulator.add(logits[:6])


def test_inception_evaluator_on_sharded_chunks_matches_the_host_path(tmp_path, monkeypatch):
  """FID/sFID statistics, IS, precision and recall of samples split over 8 devices (the
  generator's output) are those of the host path: features of numpy batches, np.cov, numpy
  k-NN. The Fréchet distance itself (unchanged, tested against pytorch-fid above) is recorded
  rather than run: a 2048-d sqrtm costs minutes on a loaded 2-core machine."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from ascan_jax.eval import inception_evaluator
  from ascan_jax.models import inception

  rng = np.random.default_rng(0)
  weights = helpers.random_inception_weights(tmp_path / "w.safetensors")
  samples = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
  real = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
  fn = inception.make_feature_fn(inception.load_params(weights))

  def host_features(images):  # the previous path: batches of 4 on one device, float64.
    out = {"pool": [], "spatial": [], "logits_unbiased": []}
    for lo in range(0, len(images), 4):
      batch = images[lo:lo + 4]
      padded = np.concatenate([batch, np.zeros((4 - len(batch), 32, 32, 3), np.uint8)])
      f = fn(padded)
      for k in out:
        out[k].append(np.asarray(f[k], np.float64)[:len(batch)])
    return {k: np.concatenate(v) for k, v in out.items()}

  f_real, f_smp = host_features(real), host_features(samples)
  reference = gm.reference_from_features(f_real["pool"], f_real["spatial"], real)
  path = str(tmp_path / "ref.npz")
  gm.save_reference(path, reference)

  evaluator = inception_evaluator.InceptionEvaluator(weights, path)
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  sharding = NamedSharding(mesh, P("batch"))
  running = evaluator.start(len(samples))
  for lo in (0, 8):  # chunks of 8 rows, one per device; the second holds 2 samples + padding.
    chunk = samples[lo:lo + 8]
    n = len(chunk)
    chunk = np.concatenate([chunk, np.full((8 - n, 32, 32, 3), 255, np.uint8)])
    evaluator.add(running, jax.device_put(chunk, sharding), n)
  frechet_calls = []
  monkeypatch.setattr(gm, "frechet_distance", lambda *a: frechet_calls.append(a) or 1.0)
  got = evaluator.finish(running)

  (mu, sigma, ref_mu, ref_sigma), (mu_s, sigma_s, ref_mu_s, ref_sigma_s) = frechet_calls
  for name, (m, c), host in (("pool", (mu, sigma), f_smp["pool"]),
                             ("spatial", (mu_s, sigma_s), f_smp["spatial"])):
    np.testing.assert_allclose(m, host.mean(0), rtol=1e-5, atol=1e-6, err_msg=name)
    want = np.cov(host, rowvar=False)
    assert np.max(np.abs(c - want)) < 1e-5 * np.max(np.abs(want)), name
  for got_ref, want_ref in ((ref_mu, reference.mu), (ref_sigma, reference.sigma),
                            (ref_mu_s, reference.mu_s), (ref_sigma_s, reference.sigma_s)):
    np.testing.assert_array_equal(got_ref, want_ref)
  is_mean, is_std = gm.inception_score(f_smp["logits_unbiased"])
  assert got["inception_score"] == pytest.approx(is_mean, rel=1e-5)
  assert got["inception_score_std"] == pytest.approx(is_std, rel=1e-3, abs=1e-6)
  precision, recall = gm.precision_recall(f_real["pool"], f_smp["pool"])
  assert (got["precision"], got["recall"]) == (precision, recall)
  assert 0 < precision < 1 or 0 < recall < 1  # not a trivial 0/1 agreement
  assert evaluator.protocol(10)["precision_recall_backend"] == "jax"
