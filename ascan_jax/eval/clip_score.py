"""CLIP score of generated images against their prompts, and CLIP image features.

``CLIPScorer(clip_dir)`` loads a Hugging Face ``CLIPModel`` directory (``models.clip``, no
torch) and its ``tokenizer.json`` (``data.clip_tokenizer``). ``score(images, prompts)``
returns, for uint8 images ``[N, H, W, 3]`` (or grey ``[N, H, W, 1]``) and N prompts:

* ``per_sample``: ``100 * max(cos(E_image, E_text), 0)`` per pair (float64 ``[N]``): the CLIP
  score as torchmetrics documents it (and as Hessel et al. 2021 define it, with weight 100
  instead of 2.5), where ``E`` are the projected embeddings (``get_image_features`` /
  ``get_text_features``);
* ``clip_score``: the mean of ``per_sample``;
* ``torchmetrics_clip_score``: ``max(100 * mean(cos), 0)``, what torchmetrics' ``CLIPScore``
  actually computes (it clamps the mean, not each pair). The two differ only when some cosine is
  negative, which real CLIP models practically never give for a caption and an image; random
  test models often do.

Images go through ``clip.preprocess_images`` (``CLIPImageProcessor`` on the device) and texts
through the tokenizer with truncation that keeps ``<|endoftext|>``; prompts longer than the text
tower's 77 positions therefore pool at their last kept token, whereas torchmetrics slices the
ids after tokenising and loses the EOS (it warns). For prompts that fit, the two agree (tested
to 1e-3 against ``torchmetrics.multimodal.clip_score.CLIPScore`` on the same directory).

Batches of ``batch_size`` pairs run under one ``jax.jit`` (the last batch is padded to the same
size and the padding dropped). With a ``mesh`` and logical-axis ``rules`` the parameters are
loaded in their shardings and every batch is split over the mesh axes the ``batch`` rule maps
to, so ``batch_size`` is rounded up to a multiple of that data-parallel size. Images and
prompts come from this process (single-process meshes).

``image_features(images)`` gives the projected image embeddings ``[N, projection_dim]``
(unnormalised, float32 numpy), the input of the data-curation heads (aesthetic, watermark,
NSFW); ``text_features(prompts)`` the text ones.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.data import clip_tokenizer
from ascan_jax.models import clip
from ascan_jax.parallel import sharding as sharding_lib


def _cosines(model: clip.CLIPModel, params, images, input_ids, attention_mask) -> jax.Array:
  image = clip.image_embeddings(model, params, images, normalize=True)
  text = clip.text_embeddings(model, params, input_ids, attention_mask, normalize=True)
  return jnp.sum(image * text, axis=-1)


class CLIPScorer:
  """CLIP score and CLIP features with one model directory (see the module docstring)."""

  def __init__(self, clip_dir: str, *, batch_size: int = 64, mesh=None, rules=None,
               dtype: Any = jnp.float32, max_length: int | None = None,
               attention_impl: str = "auto"):
    if mesh is not None and rules is None:
      raise ValueError("CLIPScorer: a mesh needs the logical-axis rules too")
    if mesh is not None and any(d.process_index != jax.process_index()
                                for d in mesh.devices.flat):
      raise ValueError("CLIPScorer takes images from one process; give each process its own "
                       "images and no mesh spanning other processes")
    self.clip_dir = clip_dir
    self.mesh, self.rules = mesh, rules
    self.model, self.params = clip.from_pretrained(clip_dir, dtype=dtype, mesh=mesh, rules=rules,
                                                   attention_impl=attention_impl)
    self.tokenizer = clip_tokenizer.CLIPTokenizer.from_directory(clip_dir)
    self.max_length = max_length or self.model.config.text.max_position_embeddings
    self.config_sha256 = clip.config_sha256(clip_dir)
    dp = sharding_lib.data_parallel_size(mesh, rules) if mesh is not None else 1
    self.batch_size = max(dp, -(-batch_size // dp) * dp)
    self._cosines = jax.jit(functools.partial(_cosines, self.model))
    self._image_features = jax.jit(functools.partial(clip.image_embeddings, self.model))
    self._text_features = jax.jit(functools.partial(clip.text_embeddings, self.model))

  # -------------------------------------------------------------------------------------------

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [N, H, W, 3] (or [N, H, W, 1]), got shape "
                       f"{images.shape}")
    return images

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim,
                                                         x.shape[0]))

  def _batches(self, *arrays: np.ndarray):
    """Fixed-size batches (edge-padded) of ``arrays`` and the number of real rows in each."""
    n = len(arrays[0])
    for lo in range(0, n, self.batch_size):
      parts = [a[lo:lo + self.batch_size] for a in arrays]
      real = len(parts[0])
      pad = self.batch_size - real
      if pad:
        parts = [np.concatenate([p, np.repeat(p[-1:], pad, axis=0)]) for p in parts]
      yield [self._put(p) for p in parts], real

  def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
    out = []
    for batch, real in self._batches(*arrays):
      if self.mesh is not None:
        with sharding_lib.in_mesh(self.mesh, self.rules):
          result = fn(self.params, *batch)
      else:
        result = fn(self.params, *batch)
      out.append(np.asarray(result)[:real])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  # -------------------------------------------------------------------------------------------

  def image_features(self, images: np.ndarray) -> np.ndarray:
    """Projected image embeddings ``[N, projection_dim]`` float32, not normalised."""
    images = self._check_images(images)
    if not len(images):
      return np.zeros((0, self.model.config.projection_dim), np.float32)
    return self._run(self._image_features, images)

  def text_features(self, prompts: Sequence[str]) -> np.ndarray:
    """Projected text embeddings ``[N, projection_dim]`` float32, not normalised."""
    ids, mask = self.tokenizer.encode(list(prompts), self.max_length)
    if not len(ids):
      return np.zeros((0, self.model.config.projection_dim), np.float32)
    return self._run(self._text_features, ids, mask)

  def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """``clip_score``, ``per_sample``, ``cosine`` (the raw cosines, float64 ``[N]``),
    ``torchmetrics_clip_score`` and ``num_samples``."""
    images = self._check_images(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP score pairs "
                       "them one to one")
    if not prompts:
      raise ValueError("CLIP score of zero images is undefined")
    ids, mask = self.tokenizer.encode(prompts, self.max_length)
    cosines = self._run(self._cosines, images, ids, mask).astype(np.float64)
    per_sample = 100.0 * np.maximum(cosines, 0.0)
    return {"clip_score": float(per_sample.mean()), "per_sample": per_sample,
            "cosine": cosines,
            "torchmetrics_clip_score": float(max(100.0 * cosines.mean(), 0.0)),
            "num_samples": len(prompts)}

  def protocol(self) -> dict[str, Any]:
    """What a CLIP score depends on, for the record."""
    return {"clip_dir": self.clip_dir, "clip_config_sha256": self.config_sha256,
            "max_length": self.max_length,
            "definition": "mean over pairs of 100 * max(cos(image, text), 0)"}
