"""mmsegmentation's ADE20K training augmentation as ops on dict records (host side, OpenCV).

Every op is ``op(example: dict, rng: numpy.random.Generator) -> dict`` acting jointly on
``'image'`` (uint8 ``[H, W, 3]``, RGB) and ``'segmentation'`` (uint8 ``[H, W]``); other keys pass
through and the input dict is not modified. The factories return ``functools.partial`` objects
of module-level functions, so the ops pickle into grain worker processes. The pipeline seeds
``rng`` per example (see ``ascan_jax.data.transforms``).

mmseg's ADE20K UperNet pipeline is ``train_ops()``: ``random_rescale`` -> ``random_crop`` ->
``random_flip`` -> ``photometric_distortion`` -> ``pad``; normalisation happens on the device.

* ``random_rescale(scale=(2048, 512), ratio_range=(0.5, 2.0))``: mmseg's ``RandomResize``
  (keep_ratio): draws ``r ~ U(ratio_range)``, target ``(int(2048 r), int(512 r))``, then mmcv's
  ``imrescale``: factor ``min(long / max(H, W), short / min(H, W))``, size ``int(x f + 0.5)``;
  bilinear for the image, nearest for the labels (OpenCV, as mmcv).
* ``random_crop(size=(512, 512), cat_max_ratio=0.75)``: mmseg's ``RandomCrop``: a uniformly placed
  window (smaller when the image is); if one class covers ``cat_max_ratio`` or more of the
  window's non-ignored pixels (or there is at most one class), a new window is drawn, up to 10
  times, and the last draw is kept.
* ``random_flip(prob=0.5)``: horizontal flip of both.
* ``photometric_distortion()``: mmseg's ``PhotoMetricDistortion`` on the image only, each step
  applied with probability 1/2: brightness ``+U(-32, 32)``; contrast ``xU(0.5, 1.5)`` either
  first or last (a coin flip); saturation ``xU(0.5, 1.5)`` in HSV; hue ``+randint(-18, 18)``
  (OpenCV's 0..179 hue, upper bound exclusive as numpy's); clipping to uint8 after each step.
* ``pad(size=(512, 512), image_value=0, seg_value=255)``: pads at the bottom and right to at
  least ``size``. mmseg pads the *normalised* image with 0, which is the mean colour in pixel
  units; ``image_value=(124, 116, 104)`` (the rounded ImageNet mean) reproduces that, the
  default 0 pads with black. Padded labels are 255 and so ignored by the loss.
* ``eval_resize(scale=(2048, 512))``: mmseg's test ``Resize(keep_ratio=True)`` on the image only
  (bilinear); the labels stay at the original resolution, where mmseg evaluates.
* ``fit_and_pad(size=(512, 512), image_value=0, seg_value=255)``: image and labels scaled together
  (bilinear / nearest, aspect kept) by ``min(H_c / H, W_c / W)`` so they fit a fixed ``H_c x W_c``
  canvas, then padded at the bottom and right; one shape for every record, so a fixed-shape jitted
  evaluation can batch images of any size (the segmentation task's in-training evaluator). The
  labels are resampled with the image: metrics on this canvas approximate the benchmark's, which
  compares at the original resolution (``ascan_jax.eval.segmentation_inference``).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import cv2
import numpy as np

IGNORE_INDEX = 255
Op = Callable[[dict, np.random.Generator], dict]


def _pair(x) -> tuple[int, int]:
  return (int(x), int(x)) if np.isscalar(x) else (int(x[0]), int(x[1]))


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
  """mmcv's keep-ratio rescale to ``scale`` (its larger entry bounds the long side, its smaller
  entry the short side)."""
  long, short = max(scale), min(scale)
  factor = min(long / max(height, width), short / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize_pair(example: dict, height: int, width: int) -> dict:
  image, seg = example["image"], example["segmentation"]
  if image.shape[:2] == (height, width):
    return dict(example)
  return {**example,
          "image": cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
          "segmentation": cv2.resize(seg, (width, height), interpolation=cv2.INTER_NEAREST)}


def _random_rescale(example: dict, rng: np.random.Generator, *, scale, ratio_range) -> dict:
  ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  return _resize_pair(example, *rescale_size(*example["image"].shape[:2], target))


def random_rescale(scale=(2048, 512), ratio_range=(0.5, 2.0)) -> Op:
  return functools.partial(_random_rescale, scale=_pair(scale),
                           ratio_range=(float(ratio_range[0]), float(ratio_range[1])))


def _crop_box(shape, size, rng) -> tuple[int, int, int, int]:
  top = int(rng.integers(0, max(shape[0] - size[0], 0) + 1))
  left = int(rng.integers(0, max(shape[1] - size[1], 0) + 1))
  return top, top + size[0], left, left + size[1]


def _random_crop(example: dict, rng: np.random.Generator, *, size, cat_max_ratio,
                 ignore_index) -> dict:
  seg = example["segmentation"]
  box = _crop_box(seg.shape, size, rng)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      labels, counts = np.unique(seg[box[0]:box[1], box[2]:box[3]], return_counts=True)
      counts = counts[labels != ignore_index]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = _crop_box(seg.shape, size, rng)
  y1, y2, x1, x2 = box
  return {**example, "image": example["image"][y1:y2, x1:x2],
          "segmentation": seg[y1:y2, x1:x2]}


def random_crop(size=(512, 512), cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX) -> Op:
  return functools.partial(_random_crop, size=_pair(size), cat_max_ratio=float(cat_max_ratio),
                           ignore_index=int(ignore_index))


def _random_flip(example: dict, rng: np.random.Generator, *, prob) -> dict:
  if rng.random() >= prob:
    return dict(example)
  return {**example, "image": example["image"][:, ::-1],
          "segmentation": example["segmentation"][:, ::-1]}


def random_flip(prob: float = 0.5) -> Op:
  return functools.partial(_random_flip, prob=float(prob))


def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _photometric_distortion(example: dict, rng: np.random.Generator, *, brightness_delta,
                            contrast_range, saturation_range, hue_delta) -> dict:
  img = np.ascontiguousarray(example["image"])

  def contrast(img):
    if rng.integers(2):
      return _affine(img, alpha=rng.uniform(*contrast_range))
    return img

  if rng.integers(2):
    img = _affine(img, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = bool(rng.integers(2))  # mmseg: mode 1 -> contrast before saturation.
  if contrast_first:
    img = contrast(img)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _affine(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-hue_delta, hue_delta))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first:
    img = contrast(img)
  return {**example, "image": img}


def photometric_distortion(brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> Op:
  return functools.partial(_photometric_distortion, brightness_delta=float(brightness_delta),
                           contrast_range=tuple(map(float, contrast_range)),
                           saturation_range=tuple(map(float, saturation_range)),
                           hue_delta=int(hue_delta))


def _pad(example: dict, rng: np.random.Generator, *, size, image_value, seg_value) -> dict:
  del rng
  image, seg = example["image"], example["segmentation"]
  height, width = max(size[0], image.shape[0]), max(size[1], image.shape[1])
  if (height, width) == image.shape[:2]:
    return dict(example)
  out_image = np.empty((height, width, image.shape[2]), np.uint8)
  out_image[...] = np.asarray(image_value, np.uint8)
  out_image[:image.shape[0], :image.shape[1]] = image
  out_seg = np.full((height, width), seg_value, np.uint8)
  out_seg[:seg.shape[0], :seg.shape[1]] = seg
  return {**example, "image": out_image, "segmentation": out_seg}


def pad(size=(512, 512), image_value=0, seg_value: int = IGNORE_INDEX) -> Op:
  value = (int(image_value),) * 3 if np.isscalar(image_value) else tuple(map(int, image_value))
  return functools.partial(_pad, size=_pair(size), image_value=value, seg_value=int(seg_value))


def _eval_resize(example: dict, rng: np.random.Generator, *, scale) -> dict:
  del rng
  image = example["image"]
  height, width = rescale_size(*image.shape[:2], scale)
  if image.shape[:2] == (height, width):
    return dict(example)
  return {**example,
          "image": cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)}


def eval_resize(scale=(2048, 512)) -> Op:
  return functools.partial(_eval_resize, scale=_pair(scale))


def _fit_and_pad(example: dict, rng: np.random.Generator, *, size, image_value,
                 seg_value) -> dict:
  height, width = example["image"].shape[:2]
  factor = min(size[0] / height, size[1] / width)
  fitted = _resize_pair(example, min(int(height * factor + 0.5), size[0]),
                        min(int(width * factor + 0.5), size[1]))
  return _pad(fitted, rng, size=size, image_value=image_value, seg_value=seg_value)


def fit_and_pad(size=(512, 512), image_value=0, seg_value: int = IGNORE_INDEX) -> Op:
  """Image and labels scaled to fit ``size`` (aspect kept), padded to exactly ``size``."""
  value = (int(image_value),) * 3 if np.isscalar(image_value) else tuple(map(int, image_value))
  return functools.partial(_fit_and_pad, size=_pair(size), image_value=value,
                           seg_value=int(seg_value))


def _compose(example: dict, rng: np.random.Generator, *, ops) -> dict:
  for op in ops:
    example = op(example, rng)
  return {**example, "image": np.ascontiguousarray(example["image"]),
          "segmentation": np.ascontiguousarray(example["segmentation"])}


def compose(ops: Sequence[Op]) -> Op:
  """The ops applied in order, with contiguous arrays at the end."""
  return functools.partial(_compose, ops=tuple(ops))


def train_ops(crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0),
              cat_max_ratio: float = 0.75, pad_image_value=0) -> Op:
  """mmseg's ADE20K UperNet training pipeline (after LoadAnnotations(reduce_zero_label))."""
  return compose([random_rescale(scale, ratio_range), random_crop(crop_size, cat_max_ratio),
                  random_flip(0.5), photometric_distortion(), pad(crop_size, pad_image_value)])
