"""Generative-model metrics on Inception features: FID, sFID, Inception Score, precision/recall.

numpy/scipy on the host (jax for the per-chunk device statistics and the precision/recall
distance blocks), computed the way the reference implementations do:

* ``feature_statistics`` / ``frechet_distance``: mean and ``np.cov`` (float64) and the Fréchet
  distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` with pytorch-fid's safeguards: if
  ``sqrtm`` of the product is not finite, ``eps`` is added to both diagonals and it is retried;
  an imaginary part is dropped when the diagonal's is below 1e-3 and raises otherwise.
  FID uses the 2048-d pool features, sFID (ADM) the 2023-d spatial features.
* ``inception_score``: improved-GAN's IS: softmax of the 1008 logits (use the model's
  ``logits_unbiased`` for numbers comparable with improved-GAN/ADM/torch-fidelity), the
  mean over ``num_splits`` (10) consecutive splits of ``exp(E[KL(p(y|x) || p(y))])`` and their
  std. ADM instead uses splits of 5000 and reports the mean: ``split_size=5000``.
* ``precision_recall``: Kynkäänniemi et al. 2019 with k=3, as ADM's evaluator computes it:
  squared Euclidean distances; a point's radius is the distance to its k-th nearest neighbour in
  its own set, counting itself (index k of the sorted row, index 0 being itself); a sample is
  "in" the reference manifold if its distance to some reference point is <= that point's
  radius (precision = fraction of samples in), and vice versa for recall. Blocks of
  ``batch_size`` x ``batch_size`` distances keep memory bounded; they are computed with numpy
  or, with ``backend="jax"``, jitted on the default JAX device (ADM uses float16 distances with
  a float32 fallback; here they are float32, so a handful of borderline points can differ).
* Streaming, for sample sets that never sit in one place: ``masked_moments`` (jit-able) turns
  one chunk of features, rows split over the devices, into its float32 mean and *centred*
  second moment (an all-reduce of ``D x D`` values, never the rows); ``MomentAccumulator``
  merges the chunks on the host in float64 with Chan et al.'s pairwise update
  (``M2 = M2_a + M2_b + d d^T n_a n_b / n``). Centring per chunk keeps float32 from cancelling:
  the error is that of a sum of at most ``chunk`` centred products (relative ~1e-7..1e-6, the
  test compares with ``np.cov`` of the same features), where raw sums of ``x x^T`` minus
  ``n mu mu^T`` would lose digits to the mean. ``InceptionScoreAccumulator`` keeps per split
  the sum of ``sum_y p log p`` and of ``p`` (float64) from chunks of logits, which is all the
  split formula needs; ``inception_score`` is the accumulator fed once, so both are one code.
* Reference statistics in ADM's reference-batch ``.npz`` format. ADM's evaluator
  (guided-diffusion ``evaluations/evaluator.py``) reads ``arr_0`` (uint8 NHWC images, streamed
  to compute activations for IS/precision/recall) and, if the key ``mu`` is present, the
  precomputed ``mu`` (2048,), ``sigma`` (2048, 2048), ``mu_s`` (2023,), ``sigma_s``
  (2023, 2023) (pool and spatial statistics, float64). ``load_reference`` validates exactly
  these, ``save_reference`` writes them (``arr_0`` optional), ``file_sha256`` fingerprints the
  file used.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
import zipfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy import special

POOL_DIM = 2048
SPATIAL_DIM = 2023
REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGES_KEY = "arr_0"


# ------------------------------------------------------------------------------------- FID


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64 (as np.cov)."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
  features = features.astype(np.float64)
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def masked_moments(features: jax.Array, count) -> tuple[jax.Array, jax.Array]:
  """Mean [D] and centred second moment ``sum_i (x_i - mean)(x_i - mean)^T`` [D, D] of the
  first ``count`` rows of ``features`` [B, D] (the rest is padding), float32. For use under
  ``jax.jit``: the rows may be split over devices; only [D] and [D, D] values are reduced."""
  x = features.astype(jnp.float32)
  valid = (jnp.arange(x.shape[0]) < count)[:, None]
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0) / jnp.maximum(count, 1).astype(jnp.float32)
  centred = jnp.where(valid, x - mean, 0.0)
  return mean, jnp.dot(centred.T, centred, precision=jax.lax.Precision.HIGHEST)


class MomentAccumulator:
  """Mean and covariance of feature rows that arrive in chunks (see the module docstring)."""

  def __init__(self):
    self.count = 0
    self.mean: np.ndarray | None = None
    self.m2: np.ndarray | None = None

  def add(self, count: int, mean, m2) -> None:
    """Merges a chunk of ``count`` rows given by its mean and centred second moment."""
    count = int(count)
    if count <= 0:
      return
    mean = np.asarray(mean, np.float64)
    m2 = np.asarray(m2, np.float64)
    m2 = 0.5 * (m2 + m2.T)  # exactly symmetric, as np.cov's product is.
    if self.count == 0:
      self.count, self.mean, self.m2 = count, mean, m2
      return
    if mean.shape != self.mean.shape:
      raise ValueError(f"a chunk of {mean.shape[0]}-d features, the others are "
                       f"{self.mean.shape[0]}-d")
    total = self.count + count
    delta = mean - self.mean
    self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
    self.mean = self.mean + delta * (count / total)
    self.count = total

  def add_features(self, features: np.ndarray) -> None:
    """Merges (N, D) feature rows held on the host (float64)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {features.shape}")
    mean = features.mean(axis=0)
    centred = features - mean
    self.add(features.shape[0], mean, centred.T @ centred)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, as ``feature_statistics``."""
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
    return self.mean, self.m2 / (self.count - 1)


def _sqrtm(a: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings():  # scipy warns about singular/ill-conditioned input; we check.
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    return linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), pytorch-fid's algorithm."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means {mu1.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    # The product is (numerically) singular: regularise both covariances.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if not np.isfinite(covmean).all():
      raise ValueError(f"sqrtm of the covariance product is not finite even with eps={eps}")
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has a large imaginary component: {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """FID between two (N, 2048) pool feature sets (any common width works)."""
  return frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2))


def sfid_from_features(spatial_1: np.ndarray, spatial_2: np.ndarray) -> float:
  """sFID (ADM): the Fréchet distance of the (N, 2023) spatial features."""
  return fid_from_features(spatial_1, spatial_2)


# --------------------------------------------------------------------------- Inception Score


def _split_bounds(n: int, num_splits: int, split_size: int | None) -> list[tuple[int, int]]:
  if split_size is not None:
    if split_size < 1:
      raise ValueError(f"split_size={split_size} must be >= 1")
    return [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
  if not 1 <= num_splits <= n:
    raise ValueError(f"num_splits={num_splits} must be in [1, N={n}]")
  return [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]


class InceptionScoreAccumulator:
  """The Inception Score of ``total`` rows of logits fed in order, a chunk at a time.

  Per split it keeps ``A = sum_i sum_y p_iy log p_iy`` and ``P = sum_i p_i`` (float64, from
  ``log_softmax``); the split's ``E[KL(p(y|x) || p(y))]`` is ``A / n - sum_y m_y log m_y`` with
  ``m = P / n`` (``0 log 0 = 0``), the same quantity as the row-wise formula.
  """

  def __init__(self, total: int, num_splits: int = 10, split_size: int | None = None):
    self.total = int(total)
    self._bounds = _split_bounds(self.total, num_splits, split_size)
    self._starts = np.asarray([lo for lo, _ in self._bounds])
    self._plogp = np.zeros(len(self._bounds))
    self._p = None
    self.seen = 0

  def add(self, logits: np.ndarray) -> None:
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
      raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
    n = logits.shape[0]
    if self.seen + n > self.total:
      raise ValueError(f"{self.seen + n} rows of logits given, the score was set up for "
                       f"{self.total}")
    if self._p is None:
      self._p = np.zeros((len(self._bounds), logits.shape[1]))
    log_p = special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    plogp = np.sum(np.where(p > 0, p * log_p, 0.0), axis=1)
    split = np.searchsorted(self._starts, self.seen + np.arange(n), side="right") - 1
    for s in np.unique(split):
      rows = split == s
      self._plogp[s] += np.sum(plogp[rows])
      self._p[s] += np.sum(p[rows], axis=0)
    self.seen += n

  def result(self) -> tuple[float, float]:
    """(mean, std) over the splits."""
    if self.seen != self.total:
      raise ValueError(f"the Inception Score needs {self.total} rows of logits, got {self.seen}")
    scores = []
    for s, (lo, hi) in enumerate(self._bounds):
      m = self._p[s] / (hi - lo)
      entropy_of_mean = np.sum(np.where(m > 0, m * np.log(np.where(m > 0, m, 1.0)), 0.0))
      scores.append(np.exp(self._plogp[s] / (hi - lo) - entropy_of_mean))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, num_splits: int = 10,
                    split_size: int | None = None) -> tuple[float, float]:
  """Inception Score of (N, C) logits: (mean, std) over splits.

  ``num_splits`` consecutive splits as improved-GAN (the i-th is
  ``[i * N // num_splits, (i + 1) * N // num_splits)``), or, if ``split_size`` is given,
  chunks of that many rows as ADM (the last may be shorter). Computed from log-softmax in
  float64, so certain predictions (p = 0 entries) are exact rather than NaN.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
  accumulator = InceptionScoreAccumulator(logits.shape[0], num_splits, split_size)
  accumulator.add(logits)
  return accumulator.result()


# ------------------------------------------------------------------------ precision / recall


def _squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """ADM's ``|u|^2 - 2 u.v + |v|^2``, clamped at 0, float32."""
  nu = np.sum(np.square(u), axis=1, dtype=np.float32)[:, None]
  nv = np.sum(np.square(v), axis=1, dtype=np.float32)[None, :]
  return np.maximum(nu - 2.0 * (u @ v.T) + nv, 0.0, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _jax_kernels():
  """jit-compiled distance blocks for ``backend="jax"`` (accelerators; float32, HIGHEST), made
  once per process so repeated evaluations reuse their compilations."""

  def d2(u, v):
    nu = jnp.sum(jnp.square(u), axis=1)[:, None]
    nv = jnp.sum(jnp.square(v), axis=1)[None, :]
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2.0 * uv + nv, 0.0)

  @functools.partial(jax.jit, static_argnums=2)
  def smallest(rows, cols, m):
    return -jax.lax.top_k(-d2(rows, cols), m)[0]

  @jax.jit
  def membership(ref, r_ref, smp, r_smp):
    d = d2(ref, smp)
    return jnp.any(d <= r_ref[:, None], axis=0), jnp.any(d <= r_smp[None, :], axis=1)

  return smallest, membership


def _check_backend(backend: str) -> None:
  if backend not in ("numpy", "jax"):
    raise ValueError(f"backend must be 'numpy' or 'jax', got {backend!r}")


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 5000,
                   backend: str = "numpy") -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour (itself counting as 0th)."""
  _check_backend(backend)
  features = np.asarray(features, np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
  smallest = _jax_kernels()[0] if backend == "jax" else None
  radii = np.empty((n,), np.float32)
  for lo in range(0, n, batch_size):
    rows = features[lo:lo + batch_size]
    best = None  # the k+1 smallest distances seen so far per row (unordered)
    for clo in range(0, n, batch_size):
      cols = features[clo:clo + batch_size]
      if smallest is not None:
        d = np.asarray(smallest(rows, cols, min(k + 1, len(cols))))
      else:
        d = _squared_distances(rows, cols)
      cand = d if best is None else np.concatenate([best, d], axis=1)
      kk = min(k + 1, cand.shape[1])
      best = np.partition(cand, kk - 1, axis=1)[:, :kk] if cand.shape[1] > kk else cand
    radii[lo:lo + batch_size] = np.partition(best, k, axis=1)[:, k]
  return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     batch_size: int = 5000, backend: str = "numpy") -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of ``samples`` vs ``reference``.

  Precision: fraction of samples inside the reference manifold (union of k-NN balls);
  recall: fraction of reference points inside the sample manifold. Memory is
  O(batch_size^2) floats. ``backend="jax"`` runs the distance blocks under ``jax.jit`` (use it
  on GPU/TPU for 50k x 50k sets; numpy/BLAS on a CPU takes minutes there).
  """
  _check_backend(backend)
  reference = np.asarray(reference, np.float32)
  samples = np.asarray(samples, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"need (N, D) feature sets of equal D, got {reference.shape}, {samples.shape}")
  radii_ref = manifold_radii(reference, k, batch_size, backend)
  radii_smp = manifold_radii(samples, k, batch_size, backend)
  membership = _jax_kernels()[1] if backend == "jax" else None
  ref_in = np.zeros(len(reference), bool)  # -> recall
  smp_in = np.zeros(len(samples), bool)  # -> precision
  for lo in range(0, len(reference), batch_size):
    ref = reference[lo:lo + batch_size]
    r_ref = radii_ref[lo:lo + batch_size]
    for clo in range(0, len(samples), batch_size):
      smp = samples[clo:clo + batch_size]
      r_smp = radii_smp[clo:clo + batch_size]
      if membership is not None:
        s_in, r_in = (np.asarray(a) for a in membership(ref, r_ref, smp, r_smp))
      else:
        d = _squared_distances(ref, smp)
        s_in, r_in = np.any(d <= r_ref[:, None], axis=0), np.any(d <= r_smp[None, :], axis=1)
      smp_in[clo:clo + batch_size] |= s_in
      ref_in[lo:lo + batch_size] |= r_in
  return float(np.mean(smp_in)), float(np.mean(ref_in))


# ---------------------------------------------------------------------- reference statistics


@dataclasses.dataclass
class ReferenceStats:
  """ADM reference-batch contents: pool/spatial statistics and (optionally) the images."""
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray
  images: np.ndarray | None = None

  def fid(self, pool_features: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(pool_features), self.mu, self.sigma)

  def sfid(self, spatial_features: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(spatial_features), self.mu_s, self.sigma_s)


def expected_reference_shapes(pool_dim: int = POOL_DIM,
                              spatial_dim: int = SPATIAL_DIM) -> dict[str, tuple[int, ...]]:
  return {"mu": (pool_dim,), "sigma": (pool_dim, pool_dim),
          "mu_s": (spatial_dim,), "sigma_s": (spatial_dim, spatial_dim)}


def _validate(arrays: dict[str, np.ndarray | None], source: str, pool_dim: int,
              spatial_dim: int) -> None:
  expected = expected_reference_shapes(pool_dim, spatial_dim)
  problems = []
  for key, shape in expected.items():
    if arrays.get(key) is None:
      problems.append(f"missing key {key!r} (expected shape {shape})")
    elif tuple(arrays[key].shape) != shape:
      problems.append(f"{key} has shape {tuple(arrays[key].shape)}, expected {shape}")
    elif not np.isfinite(arrays[key]).all():
      problems.append(f"{key} has non-finite values")
  images = arrays.get(IMAGES_KEY)
  if images is not None and (images.ndim != 4 or images.shape[-1] != 3
                             or images.dtype != np.uint8):
    problems.append(f"{IMAGES_KEY} has shape {images.shape} and dtype {images.dtype}, "
                    "expected uint8 images (N, H, W, 3)")
  if problems:
    raise ValueError(f"{source} is not a valid reference-statistics file: " + "; ".join(problems))


def load_reference(path: str, load_images: bool = False, pool_dim: int = POOL_DIM,
                   spatial_dim: int = SPATIAL_DIM) -> ReferenceStats:
  """Reads an ADM-format reference ``.npz``; raises ValueError on missing keys / bad shapes."""
  with np.load(path, allow_pickle=False) as data:
    keys = set(data.files)
    arrays = {k: np.asarray(data[k]) for k in REFERENCE_KEYS if k in keys}
    if load_images and IMAGES_KEY in keys:
      arrays[IMAGES_KEY] = np.asarray(data[IMAGES_KEY])
  if load_images and IMAGES_KEY not in arrays:
    raise ValueError(f"{path} has no {IMAGES_KEY!r} (reference images) but load_images=True")
  _validate(arrays, path, pool_dim, spatial_dim)
  return ReferenceStats(arrays["mu"], arrays["sigma"], arrays["mu_s"], arrays["sigma_s"],
                        arrays.get(IMAGES_KEY))


def save_reference(path: str, stats: ReferenceStats, pool_dim: int = POOL_DIM,
                   spatial_dim: int = SPATIAL_DIM) -> None:
  """Writes ``stats`` in ADM's format (float64 statistics; ``arr_0`` only if images given)."""
  arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
            "mu_s": np.asarray(stats.mu_s, np.float64),
            "sigma_s": np.asarray(stats.sigma_s, np.float64)}
  if stats.images is not None:
    arrays[IMAGES_KEY] = np.asarray(stats.images)
  _validate(arrays, "the statistics to save", pool_dim, spatial_dim)
  with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz".
    np.savez(f, **arrays)


def reference_from_features(pool_features: np.ndarray, spatial_features: np.ndarray,
                            images: np.ndarray | None = None) -> ReferenceStats:
  mu, sigma = feature_statistics(pool_features)
  mu_s, sigma_s = feature_statistics(spatial_features)
  return ReferenceStats(mu, sigma, mu_s, sigma_s, images)


def _open_member(zf: zipfile.ZipFile, path: str, key: str):
  if f"{key}.npy" not in zf.namelist():
    raise ValueError(f"{path} has no array {key!r} (it holds: "
                     f"{', '.join(n[:-4] for n in zf.namelist() if n.endswith('.npy'))})")
  return zf.open(f"{key}.npy")


def iter_npz_images(path: str, batch_size: int, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
  """Streams ``key`` of an ``.npz`` (e.g. ADM's ``arr_0``) in batches of rows, without
  loading the whole array (ADM's evaluator does the same); falls back to a full load for
  Fortran-ordered arrays."""
  with zipfile.ZipFile(path) as zf, _open_member(zf, path, key) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
      raise ValueError(f"{path}:{key} holds Python objects; refusing to unpickle")
    if not fortran:
      row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for lo in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - lo)
        buf = b""
        while len(buf) < n * row:  # a zip stream may return short reads
          chunk = f.read(n * row - len(buf))
          if not chunk:
            raise ValueError(f"{path}:{key} is truncated (expected {shape[0]} rows)")
          buf += chunk
        yield np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))
      return
  with np.load(path, allow_pickle=False) as data:
    arr = data[key]
  for lo in range(0, arr.shape[0], batch_size):
    yield np.ascontiguousarray(arr[lo:lo + batch_size])


def npz_array_shape(path: str, key: str = IMAGES_KEY) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of an ``.npz`` member without reading its data."""
  with zipfile.ZipFile(path) as zf, _open_member(zf, path, key) as f:
    version = np.lib.format.read_magic(f)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, _, dtype = reader(f)
  return tuple(shape), dtype


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
  """Hex sha256 of a file, to record which reference / weights file produced a number."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      h.update(chunk)
  return h.hexdigest()
