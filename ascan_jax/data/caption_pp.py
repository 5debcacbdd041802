"""Preprocessing of image-caption records: pick a caption, crop to a bucket, tokenize.

``PickCaption`` chooses the caption an example is trained with from its ``captions`` (uniformly
with the example's generator in training, so ImageNet-as-T2I draws a synonym per example and
epoch and COCO one of five captions; the canonical first one in evaluation). ``Tokenize`` turns
the caption into ``input_ids`` / ``text_mask`` (int32 ``[L]``) with any tokenizer that has
``encode(texts, max_length) -> (ids, mask)`` (``data.t5_tokenizer``). ``CaptionImageCodec`` is
the pixel-space codec: a square ``size`` (one bucket) or a bucket table (every image cropped to
its bucket's aspect and resized; ``buckets``), optional flip (off by default: it turns "a seven
left of a two" into a wrong caption) and optional random crop offsets (off by default: a crop can
cut away an object the caption names, which is why SDXL conditions on the crop coordinates),
giving ``image`` uint8 ``[h, w, 3]``, ``caption`` str and,
with a tokenizer, ``input_ids`` and ``text_mask``; its ``placeholder(bucket)`` has the bucket's
shape, as the bucketed pipeline needs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ascan_jax.data import buckets as buckets_lib
from ascan_jax.data import pp


class PickCaption:
  """``caption`` <- one of ``captions`` (random in training, the first in evaluation)."""

  def __call__(self, example: dict, rng) -> dict:
    captions = example.get("captions") or (example["caption"],)
    k = int(rng.integers(len(captions))) if rng is not None and len(captions) > 1 else 0
    return dict(example, caption=captions[k])


class Tokenize:
  """``input_ids`` and ``text_mask`` (int32 ``[max_length]``) of ``caption``."""

  def __init__(self, tokenizer, max_length: int):
    self.tokenizer, self.max_length = tokenizer, int(max_length)

  def __call__(self, example: dict, rng=None) -> dict:
    ids, mask = self.tokenizer.encode([example["caption"]], self.max_length)
    return dict(example, input_ids=ids[0], text_mask=mask[0])


class CaptionImageCodec(pp.Preprocess):
  """Caption records -> ``image`` of a bucket, ``caption`` (module docstring). Sources with
  ``load_encoded`` hand images over still encoded (``accepts_encoded``), so a large JPEG is
  decoded at a reduced size when its bucket is much smaller."""

  def __init__(self, size: int | None = None, table: Sequence[tuple[int, int]] | None = None,
               *, flip: bool = False, random_crop: bool = False, tokenizer=None,
               max_length: int = 128):
    if (size is None) == (table is None):
      raise ValueError("give a square size or a bucket table, not both")
    self.table = tuple(table) if table is not None else ((int(size), int(size)),)
    self.tokenizer, self.max_length = tokenizer, int(max_length)
    fields = ["image", "caption"] + (["input_ids", "text_mask"] if tokenizer else [])
    self.fields = tuple(fields)
    tail = ([Tokenize(tokenizer, max_length)] if tokenizer else []) + [
        pp.Cast({"image": np.uint8}), pp.Select(self.fields)]
    train_ops = [PickCaption(), buckets_lib.BucketResizeCrop(self.table,
                                                              random_crop=random_crop)]
    if flip:
      train_ops.append(pp.Flip())
    eval_ops = [PickCaption(), buckets_lib.BucketResizeCrop(self.table)] + tail
    # The placeholder depends on the bucket: ``placeholder`` below builds it.
    super().__init__(train_ops + tail, eval_ops, placeholder={}, accepts_encoded=True)

  def placeholder(self, bucket: int | None = None) -> dict:
    h, w = self.table[0 if bucket is None else int(bucket)]
    out = {"image": np.zeros((h, w, 3), np.uint8), "caption": ""}
    if self.tokenizer:
      out["input_ids"] = np.zeros(self.max_length, np.int32)
      out["text_mask"] = np.zeros(self.max_length, np.int32)
    return out
