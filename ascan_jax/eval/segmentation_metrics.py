"""Semantic-segmentation metrics: an exact confusion matrix and mmseg's mIoU / mAcc / aAcc.

The evaluator sums ``confusion_matrix`` over batches, devices and processes (integer counts, so
the sum is exact and order-independent) and calls ``metrics_from_confusion`` once at the end.

* ``confusion_matrix`` (jittable): rows are ground truth, columns predictions. A pixel counts once
  when its label is in ``[0, K)`` (so ``ignore_index`` and any other out-of-range value are left
  out) and the padding ``mask`` (``[B]`` per example or ``[B, H, W]`` per pixel) keeps it.
  Predictions must be in ``[0, K)`` (an argmax is); out-of-range ones are clipped. Counts are
  int32: a single call must see fewer than 2**31 pixels per cell; sum calls in int64 on the host.
* ``confusion_matrix_host``: the same counts in numpy int64 for predictions made on the host
  (``segmentation_inference``'s full-resolution outputs), any number of pixels.
* ``metrics_from_confusion`` follows mmseg's ``IoUMetric``: per class ``IoU = TP / (GT + P - TP)``
  and ``Acc = TP / GT``; a class absent from both ground truth and predictions has IoU NaN, a
  class absent from the ground truth has Acc NaN, and NaNs are left out of the means
  (``np.nanmean``). A class that is predicted but absent from the ground truth has IoU 0 and so
  lowers mIoU, as in mmseg. ``aAcc`` is all correct pixels over all counted pixels. Values are
  fractions in [0, 1] (mmseg prints percentages).
* ``per_class_table`` renders the per-class IoU / Acc as a Markdown table (percentages).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = 255, mask: jax.Array | None = None) -> jax.Array:
  """int32 ``[K, K]`` counts of (ground truth, prediction) over the counted pixels."""
  if pred.shape != label.shape:
    raise ValueError(f"prediction {pred.shape} and label {label.shape} shapes differ")
  label = label.astype(jnp.int32)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
    if mask.ndim == 1:
      mask = mask.reshape((-1,) + (1,) * (label.ndim - 1))
    valid = valid & jnp.broadcast_to(mask, label.shape)
  pred = jnp.clip(pred.astype(jnp.int32), 0, num_classes - 1)
  index = jnp.where(valid, label * num_classes + pred, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(
      valid.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def confusion_matrix_host(pred: np.ndarray, label: np.ndarray, num_classes: int,
                          ignore_index: int = 255) -> np.ndarray:
  """int64 ``[K, K]`` counts (ground truth, prediction) of one host prediction; labels outside
  ``[0, K)`` (``ignore_index`` among them) count nowhere, as in ``confusion_matrix``."""
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"prediction {pred.shape} and label {label.shape} shapes differ")
  label = label.astype(np.int64).reshape(-1)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  pred = np.clip(pred.astype(np.int64).reshape(-1), 0, num_classes - 1)
  counts = np.bincount(label[valid] * num_classes + pred[valid],
                       minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def metrics_from_confusion(cm) -> dict:
  """``{'mIoU', 'mAcc', 'aAcc': float, 'IoU', 'Acc': float64 [K] (NaN: see module doc)}``."""
  cm = np.asarray(cm, np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"a confusion matrix is square [K, K], not {cm.shape}")
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  union = gt + predicted - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  total = cm.sum()

  def nanmean(x):
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")

  return {"mIoU": nanmean(iou), "mAcc": nanmean(acc),
          "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
          "IoU": iou, "Acc": acc}


def _percent(x: float) -> str:
  return "nan" if np.isnan(x) else f"{100.0 * x:.2f}"


def per_class_table(metrics: dict, class_names: Sequence[str]) -> str:
  """A Markdown table: one row per class (IoU and Acc in %), then the means and aAcc."""
  iou, acc = np.asarray(metrics["IoU"]), np.asarray(metrics["Acc"])
  if len(class_names) != len(iou):
    raise ValueError(f"{len(class_names)} class names for {len(iou)} classes")
  lines = ["| class | IoU (%) | Acc (%) |", "|---|---:|---:|"]
  for name, i, a in zip(class_names, iou, acc):
    lines.append(f"| {name} | {_percent(i)} | {_percent(a)} |")
  lines.append(f"| **mean** | **{_percent(metrics['mIoU'])}** | **{_percent(metrics['mAcc'])}** |")
  lines.append("")
  lines.append(f"aAcc: {_percent(metrics['aAcc'])} %")
  return "\n".join(lines) + "\n"
