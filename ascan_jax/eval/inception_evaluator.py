"""FID, sFID, Inception Score and precision/recall of generated images, with their protocol.

``InceptionEvaluator(inception_path, reference_path)`` loads the FID Inception-v3 (safetensors
written by ``tools.convert_fid_inception``) and an ADM-format reference ``.npz``
(``generative_metrics.load_reference``; from ADM's reference batches or
``tools.compute_reference_stats``). ``protocol()`` records the number of samples, the reference
file and its sha256, the Inception weights' sha256, and the IS split convention. Precision and
recall need the reference images (``arr_0``); without them they are left out.

Samples are evaluated where they were drawn, so the evaluation scales with the hosts:
``start(num_samples)`` opens the running statistics, ``add(stats, images, count)`` takes one
chunk of uint8 images ``[B, H, W, C]`` (grey is repeated to RGB) as a global ``jax.Array``
split over a mesh (the diffusion generator's output; the first ``count`` rows are samples, the
rest padding) and runs Inception under one ``jax.jit`` on those shards with the weights
replicated over the same mesh. Per chunk only these leave the devices, replicated on every
process: the float32 mean and centred second moment of the pool (2048) and spatial (2023)
features (``generative_metrics.masked_moments``, merged in float64 on the host), the ``[B,
1008]`` logits (folded at once into the Inception Score's per-split sums) and, only when
precision/recall are computed, the ``[B, 2048]`` pool features, kept for the k-NN. Images are
never gathered. ``finish(stats)`` gives the metrics; precision and recall run on the device
(``precision_recall(backend="jax")``: blocks of 5000 x 5000 float32 distances, 100 MB, plus two
5000 x 2048 feature blocks). The reference images' pool features are computed once, streamed
from the ``.npz`` in chunks of the samples' shape and sharding. ``evaluate(images)`` does the
same for numpy images held by this process, on its local devices.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ascan_jax.diffusion import generate
from ascan_jax.eval import generative_metrics as gm
from ascan_jax.models import inception


@dataclasses.dataclass
class InceptionStatistics:
  """What ``InceptionEvaluator.add`` accumulates over the chunks of one sample set."""
  num_samples: int
  pool: gm.MomentAccumulator
  spatial: gm.MomentAccumulator
  inception_score: gm.InceptionScoreAccumulator
  pool_features: list | None  # [n, 2048] float32 per chunk, when precision/recall are wanted.


def to_rgb(images: jax.Array) -> jax.Array:
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class InceptionEvaluator:
  """See the module docstring."""

  def __init__(self, inception_path: str, reference_path: str, batch_size: int = 100):
    self.inception_path = inception_path
    self.reference_path = reference_path
    self.batch_size = batch_size
    self._variables = jax.device_get(inception.load_params(inception_path))
    self._model = inception.FIDInceptionV3()
    self.reference = gm.load_reference(reference_path)
    self.has_reference_images = self._has_images()
    self._reference_pool = None
    self._replicated = {}  # mesh -> weights replicated over it
    self._steps = {}  # (mesh, with_pool) -> jitted chunk statistics
    self._hashes = {"inception_sha256": gm.file_sha256(inception_path),
                    "reference_sha256": gm.file_sha256(reference_path)}

  def _has_images(self) -> bool:
    with np.load(self.reference_path, allow_pickle=False) as data:
      return gm.IMAGES_KEY in data.files

  # ---- one chunk on the devices ----------------------------------------------------------------
  def _step(self, mesh: Mesh, with_pool: bool):
    key = (mesh, with_pool)
    if key not in self._steps:
      model = self._model

      def chunk_statistics(variables, images, count):
        f = model.apply(variables, to_rgb(images))
        pool_mean, pool_m2 = gm.masked_moments(f["pool"], count)
        spatial_mean, spatial_m2 = gm.masked_moments(f["spatial"], count)
        out = {"pool_mean": pool_mean, "pool_m2": pool_m2, "spatial_mean": spatial_mean,
               "spatial_m2": spatial_m2, "logits": f["logits_unbiased"]}
        if with_pool:
          out["pool"] = f["pool"]
        return out

      self._steps[key] = jax.jit(chunk_statistics, out_shardings=NamedSharding(mesh, P()))
    return self._steps[key]

  def _chunk(self, images: jax.Array, count: int, with_pool: bool) -> dict[str, np.ndarray]:
    if not isinstance(images, jax.Array) or not isinstance(images.sharding, NamedSharding):
      raise TypeError("InceptionEvaluator.add takes a jax.Array with a NamedSharding (the "
                      f"generator's output), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != jnp.uint8:
      raise ValueError(f"expected uint8 images [B, H, W, 1 or 3], got {images.dtype} "
                       f"{images.shape}")
    if not 0 < count <= images.shape[0]:
      raise ValueError(f"count={count} must be in [1, {images.shape[0]}] (rows of the chunk)")
    mesh = images.sharding.mesh
    if mesh not in self._replicated:
      self._replicated[mesh] = generate.replicate(self._variables, mesh)
    out = self._step(mesh, with_pool)(self._replicated[mesh], images, np.int32(count))
    return jax.device_get(out)  # replicated: every process reads its own copy.

  # ---- running statistics ---------------------------------------------------------------------
  def start(self, num_samples: int) -> InceptionStatistics:
    return InceptionStatistics(num_samples, gm.MomentAccumulator(), gm.MomentAccumulator(),
                               gm.InceptionScoreAccumulator(num_samples),
                               [] if self.has_reference_images else None)

  def add(self, stats: InceptionStatistics, images: jax.Array, count: int) -> None:
    """Folds one chunk (see the module docstring) into ``stats``."""
    wants_pool = stats.pool_features is not None
    if wants_pool and self._reference_pool is None:
      self._reference_pool = self._reference_features(images)
    out = self._chunk(images, count, wants_pool)
    stats.pool.add(count, out["pool_mean"], out["pool_m2"])
    stats.spatial.add(count, out["spatial_mean"], out["spatial_m2"])
    stats.inception_score.add(out["logits"][:count])
    if wants_pool:
      stats.pool_features.append(np.asarray(out["pool"][:count], np.float32))

  def finish(self, stats: InceptionStatistics) -> dict[str, float]:
    if stats.pool.count != stats.num_samples:
      raise ValueError(f"{stats.pool.count} samples were added, {stats.num_samples} expected")
    is_mean, is_std = stats.inception_score.result()
    out = {"fid": gm.frechet_distance(*stats.pool.statistics(), self.reference.mu,
                                      self.reference.sigma),
           "sfid": gm.frechet_distance(*stats.spatial.statistics(), self.reference.mu_s,
                                       self.reference.sigma_s),
           "inception_score": is_mean, "inception_score_std": is_std}
    if stats.pool_features is not None:
      precision, recall = gm.precision_recall(self._reference_pool,
                                              np.concatenate(stats.pool_features), backend="jax")
      out.update(precision=precision, recall=recall)
    return {k: float(v) for k, v in out.items()}

  def _reference_features(self, like: jax.Array) -> np.ndarray:
    """Pool features of the reference images, in chunks shaped and sharded like ``like``."""
    sharding, rows = like.sharding, like.shape[0]
    pools = []
    for batch in gm.iter_npz_images(self.reference_path, rows):
      n = len(batch)
      if n < rows:
        batch = np.concatenate([batch, np.zeros((rows - n,) + batch.shape[1:], batch.dtype)])
      chunk = jax.make_array_from_callback(batch.shape, sharding, lambda index, b=batch: b[index])
      pools.append(np.asarray(self._chunk(chunk, n, True)["pool"][:n], np.float32))
    return np.concatenate(pools)

  # ---- numpy images of this process ----------------------------------------------------------
  def evaluate(self, images: np.ndarray) -> dict[str, float]:
    """The metrics of uint8 images [N, H, W, C] held by this process, on its local devices."""
    images = np.asarray(images)
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    rows = len(devices) * math.ceil(min(self.batch_size, max(1, len(images))) / len(devices))
    sharding = NamedSharding(mesh, P("batch"))
    stats = self.start(len(images))
    for lo in range(0, len(images), rows):
      batch = images[lo:lo + rows]
      n = len(batch)
      if n < rows:  # one compiled shape for every chunk.
        batch = np.concatenate([batch, np.zeros((rows - n,) + batch.shape[1:], batch.dtype)])
      self.add(stats, jax.device_put(batch, sharding), n)
    return self.finish(stats)

  def protocol(self, num_samples: int) -> dict:
    return {"num_samples": num_samples, "reference_file": self.reference_path,
            "inception_file": self.inception_path, "inception_score_splits": 10,
            "precision_recall_k": 3, "precision_recall_backend": "jax", **self._hashes}
