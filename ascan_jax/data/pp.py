"""Preprocessing of dict records: ops that act jointly on named fields, composed into codecs.

A record is a dict of named fields (``image`` uint8 [H, W, 3], ``label``, ``segmentation`` uint8
[H, W], ``caption`` str, ...). An *op* is a callable ``op(example, rng) -> example`` that reads and
writes fields by name; geometric ops take ``keys`` and apply one random draw to all of them (an
image and its label map are cropped and flipped together), resampling label maps with nearest
neighbours (``label_keys``) and images bicubically.

A *codec* is what the pipeline (``data.pipeline``) asks of a task: ``train(example, rng)``,
``eval(example)`` and ``placeholder()`` (the example that stands in for padding and for records
that cannot be decoded; its arrays also fix the dtypes and shapes of the batch). ``Preprocess``
builds one from two op lists; ``ImageCodec`` (in ``data.pipeline``) is the classification one.
Randomness comes from the ``numpy.random.Generator`` the pipeline seeds with the example's global
position, so an example is augmented identically on any number of processes or workers.

Encoded images. A codec whose ``accepts_encoded`` is true is given records from
``source.load_encoded`` where the source has one: the ``image`` field is then a
``sources.EncodedImage`` (bytes plus the header's size). ``RandomResizedCrop`` draws its box from
that size and decodes the JPEG at a reduced size when the box allows (``draft``, see
``data.transforms``); ``Resize``, ``EvalCrop`` and ``Decode`` decode it fully. Every other op
expects arrays, so such a codec starts with one of these four.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ascan_jax.data import sources
from ascan_jax.data import transforms

Op = Callable[[dict, "np.random.Generator | None"], dict]


def _resample(key: str, label_keys: Iterable[str]):
  return Image.NEAREST if key in label_keys else Image.BICUBIC


class Decode:
  """Every ``sources.EncodedImage`` among ``keys`` decoded at full size."""

  def __init__(self, keys: Sequence[str] = ("image",)):
    self.keys = tuple(keys)

  def __call__(self, example: dict, rng=None) -> dict:
    return {k: (sources.as_array(v) if k in self.keys else v) for k, v in example.items()}


class RandomResizedCrop:
  """Inception-style crop (one box for every key), resized to ``size``. An encoded image is
  decoded at the largest reduction the box allows when ``draft`` (the box is the same)."""

  def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               keys: Sequence[str] = ("image",), label_keys: Sequence[str] = (),
               draft: bool = True):
    self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
    self.keys, self.label_keys = tuple(keys), tuple(label_keys)
    self.draft = draft

  def __call__(self, example: dict, rng) -> dict:
    h, w = np.shape(example[self.keys[0]])[:2]
    box = transforms.random_resized_crop_box(h, w, rng, self.scale, self.ratio)
    out = dict(example)
    for k in self.keys:
      x, resample = example[k], _resample(k, self.label_keys)
      if isinstance(x, sources.EncodedImage):
        out[k] = transforms.crop_and_resize_encoded(x, box, self.size, resample, self.draft)
      else:
        out[k] = transforms.crop_and_resize(x, box, self.size, resample)
    return out


class Resize:
  """Every key resized to ``size`` x ``size`` (no-op when already that size)."""

  def __init__(self, size: int, keys: Sequence[str] = ("image",),
               label_keys: Sequence[str] = ()):
    self.size, self.keys, self.label_keys = size, tuple(keys), tuple(label_keys)

  def __call__(self, example: dict, rng=None) -> dict:
    out = dict(example)
    for k in self.keys:
      x = sources.as_array(example[k])
      if x.shape[0] != self.size or x.shape[1] != self.size:
        x = np.asarray(Image.fromarray(x).resize((self.size, self.size),
                                                 _resample(k, self.label_keys)))
      out[k] = x
    return out


class EvalCrop:
  """Short side resized to ``size / crop_fraction``, then a centre crop (the ImageNet protocol).

  ``resize_small_squares``: square images no larger than ``size`` are resized to ``size``
  instead, so nothing is cropped away (digits, 28x28 -> 32x32). It changes the protocol for any
  dataset with such images, so it is a config choice (``data.eval_resize_small_squares``: off
  for ImageNet, on for the embedded digits), never inferred from the data."""

  def __init__(self, size: int, crop_fraction: float, keys: Sequence[str] = ("image",),
               resize_small_squares: bool = False):
    self.size, self.fraction, self.keys = size, float(crop_fraction), tuple(keys)
    self.resize_small_squares = resize_small_squares

  def __call__(self, example: dict, rng=None) -> dict:
    out = dict(example)
    for k in self.keys:
      x = sources.as_array(example[k])
      if self.resize_small_squares and x.shape[0] == x.shape[1] and x.shape[0] <= self.size:
        out[k] = transforms.resize(x, self.size)
      else:
        out[k] = transforms.eval_crop(x, self.size, self.fraction)
    return out


class Flip:
  """Horizontal flip of every key with probability 0.5 (one draw)."""

  def __init__(self, keys: Sequence[str] = ("image",)):
    self.keys = tuple(keys)

  def __call__(self, example: dict, rng) -> dict:
    if rng.random() >= 0.5:
      return example
    out = dict(example)
    for k in self.keys:
      out[k] = example[k][:, ::-1]
    return out


class RandAugment:
  """``transforms.rand_augment``; the magnitude is clamped to ``magnitude_max`` (timm's 10 by
  default; ``None``: unbounded)."""

  def __init__(self, layers: int, magnitude: float, key: str = "image",
               magnitude_max: float | None = transforms.RAND_AUGMENT_MAGNITUDE_MAX):
    self.layers, self.magnitude, self.key = layers, magnitude, key
    self.magnitude_max = magnitude_max

  def __call__(self, example: dict, rng) -> dict:
    return {**example, self.key: transforms.rand_augment(example[self.key], rng, self.layers,
                                                         self.magnitude, self.magnitude_max)}


class ColorJitter:
  def __init__(self, strength: float, key: str = "image"):
    self.strength, self.key = strength, key

  def __call__(self, example: dict, rng) -> dict:
    return {**example, self.key: transforms.color_jitter(example[self.key], rng, self.strength)}


class Cast:
  """Fields as numpy values of the given dtypes, arrays made contiguous (after flips/crops)."""

  def __init__(self, dtypes: dict):
    self.dtypes = dict(dtypes)

  def __call__(self, example: dict, rng=None) -> dict:
    out = dict(example)
    for k, dtype in self.dtypes.items():
      x = np.asarray(example[k], dtype)
      out[k] = np.ascontiguousarray(x) if x.ndim else x
    return out


class Select:
  """Keeps only ``keys`` (drops source fields the model does not use)."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def __call__(self, example: dict, rng=None) -> dict:
    return {k: example[k] for k in self.keys}


class Preprocess:
  """A codec from op lists: ``train`` runs ``train_ops`` with the example's generator, ``eval``
  runs ``eval_ops``; ``placeholder`` is a copy of ``placeholder``. ``accepts_encoded``: both op
  lists start with an op that takes a ``sources.EncodedImage`` (see the module docstring)."""

  def __init__(self, train_ops: Sequence[Op], eval_ops: Sequence[Op], placeholder: dict,
               accepts_encoded: bool = False):
    self.train_ops, self.eval_ops = list(train_ops), list(eval_ops)
    self._placeholder = placeholder
    self.accepts_encoded = bool(accepts_encoded)

  def train(self, example: dict, rng: np.random.Generator) -> dict:
    for op in self.train_ops:
      example = op(example, rng)
    return example

  def eval(self, example: dict) -> dict:
    for op in self.eval_ops:
      example = op(example, None)
    return example

  def placeholder(self) -> dict:
    return {k: (np.copy(v) if isinstance(v, np.ndarray) else v)
            for k, v in self._placeholder.items()}
