"""The T5 tokenizer: a sentencepiece model (``spiece.model``) plus T5's conventions.

``T5Tokenizer(path).encode(texts, max_length)`` gives what transformers'
``T5Tokenizer.from_pretrained(DIR)(texts, max_length=L, padding="max_length", truncation=True)``
gives for the same ``spiece.model``, without transformers or torch:

* ids of the sentencepiece segmentation, then the end-of-sequence id; texts longer than
  ``max_length`` are cut to ``max_length - 1`` pieces and still end with EOS; shorter ones are
  padded with the pad id. The mask is 1 on the pieces and the EOS, 0 on the padding. An empty
  text is ``[EOS]`` (the unconditional prompt of classifier-free guidance).
* The sentinel tokens ``<extra_id_0>`` ... ``<extra_id_{extra_ids-1}>`` (ids after the
  sentencepiece vocabulary, in reverse order: ``<extra_id_0>`` is the last id) and the pad, EOS
  and unk pieces written literally in a text are single tokens, as transformers' added special
  tokens are; the text between them is encoded piece by piece. (transformers 5's ``T5Tokenizer``
  is a ``tokenizers`` Unigram model converted from the same file: it splits on whitespace and
  gives each word the "▁" prefix, which is what sentencepiece's default normalisation does.)

``spiece.model`` must have T5's ids: pad 0, EOS 1, unk 2, no BOS (``tools.make_random_t5``
trains such a model). Texts must be ``str`` (or UTF-8 ``bytes``); anything else, undecodable
bytes and unpaired surrogates raise an error naming the text's position.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

SPIECE_NAME = "spiece.model"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_EXTRA_IDS = 100  # T5's sentinel count (transformers' default ``extra_ids``).


class T5Tokenizer:
  """Text -> T5 token ids and masks (see the module docstring)."""

  def __init__(self, spiece_model_path: str, extra_ids: int = DEFAULT_EXTRA_IDS):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(spiece_model_path):
      raise FileNotFoundError(f"sentencepiece model {spiece_model_path} not found")
    if not isinstance(extra_ids, int) or extra_ids < 0:
      raise ValueError(f"extra_ids must be a non-negative integer, got {extra_ids!r}")
    self.path = spiece_model_path
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(spiece_model_path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{spiece_model_path} is not a sentencepiece model: {e}") from None
    self.pad_id, self.eos_id, self.unk_id = (self._sp.pad_id(), self._sp.eos_id(),
                                             self._sp.unk_id())
    if min(self.pad_id, self.eos_id) < 0:
      raise ValueError(f"{spiece_model_path} has no pad or no EOS piece (pad_id={self.pad_id}, "
                       f"eos_id={self.eos_id}); a T5 sentencepiece model has pad 0, EOS 1, unk 2")
    self.extra_ids = extra_ids
    self.num_pieces = self._sp.GetPieceSize()
    self.special_ids = {self._sp.IdToPiece(i): i for i in (self.pad_id, self.eos_id, self.unk_id)}
    self.special_ids.update({f"<extra_id_{i}>": self.num_pieces + extra_ids - 1 - i
                             for i in range(extra_ids)})
    by_length = sorted(self.special_ids, key=len, reverse=True)
    self._special_re = re.compile("(" + "|".join(re.escape(s) for s in by_length) + ")")

  @classmethod
  def from_directory(cls, directory: str) -> "T5Tokenizer":
    """``DIR/spiece.model``; ``extra_ids`` from ``DIR/tokenizer_config.json`` when it says."""
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    path = os.path.join(directory, SPIECE_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory!r} has no {SPIECE_NAME} (the T5 sentencepiece model)")
    extra_ids = DEFAULT_EXTRA_IDS
    config_path = os.path.join(directory, TOKENIZER_CONFIG_NAME)
    if os.path.isfile(config_path):
      try:
        with open(config_path) as f:
          extra_ids = json.load(f).get("extra_ids", DEFAULT_EXTRA_IDS)
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a JSON object: {e}") from None
    return cls(path, extra_ids=extra_ids)

  @property
  def vocab_size(self) -> int:
    """Sentencepiece pieces plus sentinels: ids are below this (the model's table may be larger)."""
    return self.num_pieces + self.extra_ids

  def tokenize(self, text: str) -> list[int]:
    """The ids of one text, without EOS."""
    ids: list[int] = []
    for i, part in enumerate(self._special_re.split(text)):
      if i % 2:  # the splitting regex has one group: odd parts are special tokens.
        ids.append(self.special_ids[part])
      elif part:
        ids.extend(self._sp.EncodeAsIds(part))
    return ids

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, both int32 ``[len(texts), max_length]`` (see the module docstring)."""
    if isinstance(texts, (str, bytes)):
      raise TypeError("encode takes a list of texts, not one text")
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    texts = [_as_text(t, i) for i, t in enumerate(texts)]
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = self.tokenize(text)[:max_length - 1] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def _as_text(text, index: int) -> str:
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"text {index} is not valid UTF-8: {e}") from None
  if not isinstance(text, str):
    raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"text {index} is not valid Unicode ({e.reason} at position {e.start}): "
                     f"{text[:60]!r}") from None
  return text
