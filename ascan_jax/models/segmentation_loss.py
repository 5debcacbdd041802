"""Pixel-wise cross-entropy for semantic segmentation, with an ignore label and an auxiliary term.

``segmentation_loss`` is a pure function of logits and labels (no model, no training code), so
the segmentation task and tests can call it directly:

* a pixel counts when its label is in ``[0, K)`` (not ``ignore_index``, 255 after ADE20K's
  reduce_zero_label) and the optional padding ``mask`` (``[B]`` or ``[B, H, W]``) keeps it;
* ``normalize="valid"`` averages over the counted pixels (PyTorch's ``cross_entropy`` with
  ``ignore_index``; mmseg's ``avg_non_ignore=True``); ``normalize="all"`` divides by every
  unmasked pixel, ignored ones included, which is what mmseg's ``CrossEntropyLoss`` does with
  its default ``avg_non_ignore=False`` (the setting behind its published UperNet numbers);
* the auxiliary head's loss is added with weight ``aux_weight`` (mmseg's UperNet configs: 0.4);
* the returned accuracy is the main head's pixel accuracy over the counted pixels.

Losses are computed in float32 whatever the logits' dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("valid", "all")


def _pixel_weights(labels: jax.Array, num_classes: int, ignore_index: int,
                   mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(valid pixels [B, H, W] float32, unmasked pixels [B, H, W] float32)."""
  keep = jnp.ones(labels.shape, jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.ndim == 1:
      mask = mask[:, None, None]
    keep = jnp.broadcast_to(mask.astype(jnp.float32), labels.shape)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  return keep * valid.astype(jnp.float32), keep


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                        mask: jax.Array | None = None,
                        normalize: str = "valid") -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, valid pixel weights [B, H, W]) of ``logits [B, H, W, K]`` against
  integer ``labels [B, H, W]``."""
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZATIONS}")
  if logits.shape[:3] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} differ in [B, H, W]; "
                     f"resize the logits to the label resolution first")
  num_classes = logits.shape[-1]
  valid, keep = _pixel_weights(labels, num_classes, ignore_index, mask)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(valid > 0, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  denominator = valid.sum() if normalize == "valid" else keep.sum()
  return (nll * valid).sum() / jnp.maximum(denominator, 1.0), valid


def segmentation_loss(logits: jax.Array, labels: jax.Array, aux_logits: jax.Array | None = None,
                      aux_weight: float = 0.4, ignore_index: int = 255,
                      mask: jax.Array | None = None,
                      normalize: str = "valid") -> tuple[jax.Array, jax.Array]:
  """``(loss, pixel accuracy)``: main cross-entropy + ``aux_weight`` x auxiliary cross-entropy."""
  loss, valid = pixel_cross_entropy(logits, labels, ignore_index, mask, normalize)
  if aux_logits is not None:
    aux, _ = pixel_cross_entropy(aux_logits, labels, ignore_index, mask, normalize)
    loss = loss + aux_weight * aux
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * valid
  return loss, correct.sum() / jnp.maximum(valid.sum(), 1.0)
