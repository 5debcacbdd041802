"""Semantic-segmentation inference modes (mmseg's test pipeline) as functions of a logits callable.

Every function takes a list of uint8 ``[H, W, 3]`` images of any sizes and a (jitted)
``logits_fn(images float32 [B, h, w, 3] in 0..255 pixel units) -> logits [B, h, w, K]`` (the
caller's model with its normalisation) and returns one int32 ``[H, W]`` prediction per image at
its original resolution. No task or training code is involved.

* Test resize (mmseg ADE20K: ``Resize(scale=(2048, 512), keep_ratio=True)``): the image is
  scaled by ``min(long_side / max(H, W), short_side / min(H, W))`` to ``int(H f + 0.5) x
  int(W f + 0.5)`` with OpenCV bilinear on uint8, as mmcv's ``imrescale``.
* ``single_scale`` (mmseg ``mode='whole'``): the resized image is padded at the bottom and right
  up to the next multiple of ``size_divisor`` (default 32: with the short side at 512 the long
  side takes one of 49 values, 512..2048, per orientation; a larger divisor means fewer compiled
  shapes and more padding), the logits are cropped back to the resized image, resized
  bilinearly (``align_corners=False``) to the original resolution, and the argmax taken. Padding is filled with ``pad_value``, by
  default the ImageNet mean pixel, which normalises to 0 as mmseg's padding of normalised
  images does. Unlike mmseg (which runs each image at its own size) padded pixels take part in
  the backbone's global attention.
* ``multi_scale_flip`` (mmseg 0.x ``MultiScaleFlipAug`` / 1.x ``SegTTAModel``): for every scale
  ratio ``r`` the test resize uses ``(int(long_side r), int(short_side r))`` (mmseg 0.x's
  ``img_ratios`` on ``img_scale``; mmseg 1.x's default ``tta_pipeline`` scales the original
  image instead), optionally also the horizontally flipped image (its logits flipped back);
  the softmax probabilities at the original resolution are averaged (as ``SegTTAModel
  .merge_preds``) and the argmax taken. With ``scales=(1.0,)`` and ``flip=False`` it is
  ``single_scale``.
* ``sliding_window`` (mmseg ``mode='slide'``, ADE20K: crop 512, stride 341): windows at
  ``y1 = i * stride`` (the last one pushed back inside the image), ``h_grids = max(h - crop +
  stride - 1, 0) // stride + 1`` per axis, logits summed and divided by a count map. A window
  larger than the resized image (mmseg runs it at the image's size) is padded to the crop size,
  so only one window shape is ever compiled: an image that fits in one window gives exactly
  ``single_scale(..., size_divisor=crop)``.

Batches: inputs of equal shape are stacked ``batch_size`` at a time, the last batch padded with
blank images, so the compiled shapes are ``(batch_size, h, w, 3)`` only. Logits are brought to
the host and resized there (OpenCV), so memory is one batch of logits plus, for
``multi_scale_flip``, one ``[H, W, K]`` float32 sum per image: pass a few images per call.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

MEAN_PIXEL = (123.675, 116.28, 103.53)  # ImageNet mean (RGB): zero after normalisation.
MODES = ("whole", "slide")
_CV2_MAX_CHANNELS = 128  # OpenCV 5's resize handles at most this many channels per call.

LogitsFn = Callable[[np.ndarray], np.ndarray]


def rescale_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
  """mmcv's keep-ratio rescale: the largest size with short side <= ``short_side`` and long
  side <= ``long_side`` (one of them reached)."""
  factor = min(long_side / max(height, width), short_side / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 ``[H, W, 3]`` -> ``[height, width, 3]``, OpenCV bilinear (mmcv's default)."""
  if image.shape[:2] == (height, width):
    return image
  return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_scores(scores: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 ``[h, w, K]`` -> ``[height, width, K]``, bilinear with half-pixel centres."""
  if scores.shape[:2] == (height, width):
    return scores
  parts = [cv2.resize(np.ascontiguousarray(scores[..., c:c + _CV2_MAX_CHANNELS]),
                      (width, height), interpolation=cv2.INTER_LINEAR)
           for c in range(0, scores.shape[-1], _CV2_MAX_CHANNELS)]
  parts = [p[..., None] if p.ndim == 2 else p for p in parts]
  return np.concatenate(parts, axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _pair(x) -> tuple[int, int]:
  return (int(x), int(x)) if np.isscalar(x) else (int(x[0]), int(x[1]))


def _canvas(image: np.ndarray, height: int, width: int, pad_value) -> np.ndarray:
  out = np.empty((height, width, 3), np.float32)
  out[...] = np.asarray(pad_value, np.float32)
  out[:image.shape[0], :image.shape[1]] = image
  return out


def _check_images(images) -> list[np.ndarray]:
  if isinstance(images, np.ndarray) and images.ndim == 3:
    raise ValueError("pass a list of images (or a [B, H, W, 3] array), not one [H, W, 3] image")
  out = []
  for i, im in enumerate(images):
    im = np.asarray(im)
    if im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f"image {i} has shape {im.shape}; expected [H, W, 3]")
    out.append(im.astype(np.uint8))
  return out


def _run_batched(items: list[tuple[np.ndarray, Callable[[np.ndarray], None]]],
                 logits_fn: LogitsFn, batch_size: int):
  """Runs ``logits_fn`` over the inputs grouped by shape, ``batch_size`` at a time (the last
  batch padded), and hands each input's logits ``[h, w, K]`` to its callback."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, (x, _) in enumerate(items):
    groups.setdefault(x.shape, []).append(i)
  for shape, indices in groups.items():
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      batch = np.zeros((batch_size,) + shape, np.float32)
      for j, i in enumerate(chunk):
        batch[j] = items[i][0]
      logits = np.asarray(logits_fn(batch), np.float32)
      if logits.ndim != 4 or logits.shape[:3] != batch.shape[:3]:
        raise ValueError(f"logits_fn returned {logits.shape} for images {batch.shape}; "
                         f"expected [B, h, w, K] at the input resolution")
      for j, i in enumerate(chunk):
        items[i][1](logits[j])


def _windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]):
  """mmseg's slide_inference window boxes ``(y1, y2, x1, x2)``."""
  (ch, cw), (sh, sw) = crop, stride
  h_grids = max(height - ch + sh - 1, 0) // sh + 1
  w_grids = max(width - cw + sw - 1, 0) // sw + 1
  for i in range(h_grids):
    for j in range(w_grids):
      y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
      yield max(y2 - ch, 0), y2, max(x2 - cw, 0), x2


def view_scores(images: Sequence[np.ndarray], logits_fn: LogitsFn, *, scale: float = 1.0,
                flip: bool = False, mode: str = "whole", short_side: int = 512,
                long_side: int = 2048, size_divisor: int = 32, crop=512, stride=341,
                pad_value=MEAN_PIXEL, batch_size: int = 1) -> list[np.ndarray]:
  """Logits of one test view (scale ratio, flip) at each image's original resolution:
  float32 ``[H, W, K]`` per image."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  images = _check_images(images)
  crop, stride = _pair(crop), _pair(stride)
  short, long = int(short_side * scale), int(long_side * scale)
  results: list[np.ndarray | None] = [None] * len(images)
  items = []
  finishers = []
  for index, image in enumerate(images):
    height, width = image.shape[:2]
    nh, nw = rescale_size(height, width, short, long)
    x = resize_image(image, nh, nw)
    if flip:
      x = x[:, ::-1]

    def finish(scores, index=index, height=height, width=width):
      if flip:
        scores = scores[:, ::-1]
      results[index] = resize_scores(np.ascontiguousarray(scores), height, width)

    if mode == "whole":
      ph, pw = -(-nh // size_divisor) * size_divisor, -(-nw // size_divisor) * size_divisor
      items.append((_canvas(x, ph, pw, pad_value),
                    lambda logits, nh=nh, nw=nw, finish=finish: finish(logits[:nh, :nw])))
      continue
    total: dict[str, np.ndarray] = {}
    count = np.zeros((nh, nw, 1), np.float32)
    for y1, y2, x1, x2 in _windows(nh, nw, crop, stride):
      count[y1:y2, x1:x2] += 1.0

      def add(logits, y1=y1, y2=y2, x1=x1, x2=x2, total=total, nh=nh, nw=nw):
        if "sum" not in total:
          total["sum"] = np.zeros((nh, nw, logits.shape[-1]), np.float32)
        total["sum"][y1:y2, x1:x2] += logits[:y2 - y1, :x2 - x1]

      items.append((_canvas(x[y1:y2, x1:x2], crop[0], crop[1], pad_value), add))
    finishers.append(lambda total=total, count=count, finish=finish:
                     finish(total["sum"] / count))
  _run_batched(items, logits_fn, batch_size)
  for f in finishers:
    f()
  return results


def _predict(scores: list[np.ndarray]) -> list[np.ndarray]:
  return [np.argmax(s, axis=-1).astype(np.int32) for s in scores]


def single_scale(images: Sequence[np.ndarray], logits_fn: LogitsFn, short_side: int = 512,
                 long_side: int = 2048, size_divisor: int = 32, pad_value=MEAN_PIXEL,
                 batch_size: int = 1) -> list[np.ndarray]:
  """Whole-image inference at the test resize; int32 ``[H, W]`` predictions."""
  return _predict(view_scores(images, logits_fn, short_side=short_side, long_side=long_side,
                              size_divisor=size_divisor, pad_value=pad_value,
                              batch_size=batch_size))


def sliding_window(images: Sequence[np.ndarray], logits_fn: LogitsFn, crop=512, stride=341,
                   short_side: int = 512, long_side: int = 2048, pad_value=MEAN_PIXEL,
                   batch_size: int = 1) -> list[np.ndarray]:
  """Sliding-window inference at the test resize; int32 ``[H, W]`` predictions."""
  return _predict(view_scores(images, logits_fn, mode="slide", crop=crop, stride=stride,
                              short_side=short_side, long_side=long_side,
                              pad_value=pad_value, batch_size=batch_size))


def average_probabilities(images: Sequence[np.ndarray], logits_fn: LogitsFn,
                          scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                          flip: bool = True, **view_kwargs) -> list[np.ndarray]:
  """Softmax probabilities averaged over scales (and flips) at the original resolution."""
  views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
  if not views:
    raise ValueError("multi-scale inference needs at least one scale")
  images = _check_images(images)
  sums = None
  for scale, flipped in views:
    probs = [softmax(s) for s in view_scores(images, logits_fn, scale=scale, flip=flipped,
                                             **view_kwargs)]
    sums = probs if sums is None else [a + b for a, b in zip(sums, probs)]
  return [s / len(views) for s in sums]


def multi_scale_flip(images: Sequence[np.ndarray], logits_fn: LogitsFn,
                     scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                     flip: bool = True, **view_kwargs) -> list[np.ndarray]:
  """Test-time augmentation: argmax of the averaged probabilities; ``view_kwargs`` as
  ``view_scores`` (``mode='slide'`` slides at every scale)."""
  return _predict(average_probabilities(images, logits_fn, scales, flip, **view_kwargs))
