"""FID, sFID, Inception Score and precision/recall of generated images, with their protocol.

``InceptionEvaluator(inception_path, reference_path)`` loads the FID Inception-v3 (safetensors
written by ``tools.convert_fid_inception``) and an ADM-format reference ``.npz``
(``generative_metrics.load_reference``; from ADM's reference batches or
``tools.compute_reference_stats``). ``evaluate(images)`` returns the metrics of uint8 images
(grey images are repeated to RGB) plus ``protocol()``: the number of samples, the reference file
and its sha256, the Inception weights' sha256, and the IS split convention. Precision and recall
need the reference images (``arr_0``); without them they are left out.
"""
from __future__ import annotations

import numpy as np

from ascan_jax.eval import generative_metrics as gm
from ascan_jax.models import inception


class InceptionEvaluator:

  def __init__(self, inception_path: str, reference_path: str, batch_size: int = 100):
    self.inception_path = inception_path
    self.reference_path = reference_path
    self.batch_size = batch_size
    self._features = inception.make_feature_fn(inception.load_params(inception_path))
    self.reference = gm.load_reference(reference_path, load_images=self._has_images())
    self._reference_pool = None
    self._hashes = {"inception_sha256": gm.file_sha256(inception_path),
                    "reference_sha256": gm.file_sha256(reference_path)}

  def _has_images(self) -> bool:
    with np.load(self.reference_path, allow_pickle=False) as data:
      return gm.IMAGES_KEY in data.files

  def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """pool / spatial / logits_unbiased of uint8 images [N, H, W, C], in batches."""
    images = np.asarray(images)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    out = {"pool": [], "spatial": [], "logits_unbiased": []}
    batch = max(1, min(self.batch_size, len(images)))
    for i in range(0, len(images), batch):
      chunk = images[i:i + batch]
      n = len(chunk)
      if n < batch:  # one compiled shape per call.
        chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
      f = self._features(chunk)
      for k in out:
        out[k].append(np.asarray(f[k], np.float64)[:n])
    return {k: np.concatenate(v) for k, v in out.items()}

  def evaluate(self, images: np.ndarray) -> dict[str, float]:
    f = self.features(images)
    is_mean, is_std = gm.inception_score(f["logits_unbiased"])
    out = {"fid": self.reference.fid(f["pool"]), "sfid": self.reference.sfid(f["spatial"]),
           "inception_score": is_mean, "inception_score_std": is_std}
    if self.reference.images is not None:
      if self._reference_pool is None:
        self._reference_pool = self.features(self.reference.images)["pool"]
      precision, recall = gm.precision_recall(self._reference_pool, f["pool"])
      out.update(precision=precision, recall=recall)
    return {k: float(v) for k, v in out.items()}

  def protocol(self, num_samples: int) -> dict:
    return {"num_samples": num_samples, "reference_file": self.reference_path,
            "inception_file": self.inception_path, "inception_score_splits": 10,
            "precision_recall_k": 3, **self._hashes}
