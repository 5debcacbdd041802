"""Host-side image transforms (PIL/numpy): training augmentation and evaluation crops.

Every random transform takes a ``numpy.random.Generator``; the pipeline seeds it from the run seed
and the example's *global* position in the data stream, so an example gets the same augmentation
whatever the number of processes, workers or restarts.

* ``random_resized_crop``: Inception-style area/aspect sampling (scale (0.08, 1), ratio (3/4, 4/3)),
  10 tries, then a centre crop fallback; bicubic resize.
* ``color_jitter``: brightness, contrast and saturation factors in [1 - s, 1 + s], in random order.
* ``rand_augment``: RandAugment (Cubuk et al. 2019) with ``layers`` ops per image, each drawn
  uniformly from 14 ops, at magnitude ``m`` on the scale where 10 is each op's reference maximum
  (the TF/TPU implementation MaxViT used; the paper's m=15 is 1.5x that reference).
* ``eval_crop``: resize the short side to ``size / crop_fraction``, then a centre crop.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (128, 128, 128)


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """``(top, left, crop_height, crop_width)`` of an Inception-style random crop."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return top, left, ch, cw
  ch = cw = min(height, width)
  return (height - ch) // 2, (width - cw) // 2, ch, cw


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size,
                    resample=Image.BICUBIC) -> np.ndarray:
  """``image[box]`` resized to ``size`` (an int for squares, or ``(height, width)``)."""
  top, left, ch, cw = box
  h, w = (size, size) if isinstance(size, int) else size
  crop = _pil(image).crop((left, top, left + cw, top + ch))
  return np.asarray(crop.resize((w, h), resample))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return crop_and_resize(image, box, size)


def eval_crop(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  h, w = image.shape[:2]
  short = max(size, int(round(size / crop_fraction)))
  if h <= w:
    nh, nw = short, max(short, int(round(w * short / h)))
  else:
    nh, nw = max(short, int(round(h * short / w))), short
  im = _pil(image).resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(im.crop((left, top, left + size, top + size)))


def resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(_pil(image).resize((size, size), Image.BICUBIC))


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  im = _pil(image)
  ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
  for idx in rng.permutation(len(ops)):
    im = ops[idx](im).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
  return np.asarray(im)


# ---- RandAugment ---------------------------------------------------------------------------------
def _signed(rng, value):
  return value if rng.random() < 0.5 else -value


def _affine(im, matrix):
  return im.transform(im.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _op_identity(im, level, rng):
  return im


def _op_autocontrast(im, level, rng):
  return ImageOps.autocontrast(im)


def _op_equalize(im, level, rng):
  return ImageOps.equalize(im)


def _op_rotate(im, level, rng):
  return im.rotate(_signed(rng, 30.0 * level), resample=Image.BILINEAR, fillcolor=_FILL)


def _op_solarize(im, level, rng):
  return ImageOps.solarize(im, max(0, int(256 - 256 * min(level, 1.0))))


def _op_posterize(im, level, rng):
  return ImageOps.posterize(im, max(1, int(8 - 4 * min(level, 1.0))))


def _enhance(cls):
  def op(im, level, rng):
    return cls(im).enhance(max(0.0, 1.0 + _signed(rng, 0.9 * level)))
  return op


def _op_shear_x(im, level, rng):
  return _affine(im, (1, _signed(rng, 0.3 * level), 0, 0, 1, 0))


def _op_shear_y(im, level, rng):
  return _affine(im, (1, 0, 0, _signed(rng, 0.3 * level), 1, 0))


def _op_translate_x(im, level, rng):
  return _affine(im, (1, 0, _signed(rng, 0.45 * level * im.size[0]), 0, 1, 0))


def _op_translate_y(im, level, rng):
  return _affine(im, (1, 0, 0, 0, 1, _signed(rng, 0.45 * level * im.size[1])))


RAND_AUGMENT_OPS = (
    _op_identity, _op_autocontrast, _op_equalize, _op_rotate, _op_solarize, _op_posterize,
    _enhance(ImageEnhance.Color), _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness), _enhance(ImageEnhance.Sharpness),
    _op_shear_x, _op_shear_y, _op_translate_x, _op_translate_y,
)


def rand_augment(image: np.ndarray, rng: np.random.Generator, layers: int,
                 magnitude: float) -> np.ndarray:
  """``layers`` random ops at ``magnitude`` (10 = each op's reference maximum)."""
  if layers <= 0:
    return image
  im = _pil(image)
  level = magnitude / 10.0
  for _ in range(layers):
    op = RAND_AUGMENT_OPS[int(rng.integers(len(RAND_AUGMENT_OPS)))]
    im = op(im, level, rng)
  return np.asarray(im)


def train_transform(image: np.ndarray, rng: np.random.Generator, size: int, aug) -> np.ndarray:
  """The training augmentation of ``config.augment`` (mixup/cutmix run later, on device)."""
  if aug.random_resized_crop:
    image = random_resized_crop(image, rng, size, scale=(aug.crop_min_scale, 1.0))
  else:
    image = resize(image, size)
  if aug.flip:
    image = flip(image, rng)
  image = rand_augment(image, rng, aug.randaugment_layers, aug.randaugment_magnitude)
  if aug.color_jitter > 0:
    image = color_jitter(image, rng, aug.color_jitter)
  return np.ascontiguousarray(image, np.uint8)
