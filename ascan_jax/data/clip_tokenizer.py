"""CLIP's byte-level BPE tokenizer, read from a Hugging Face directory's ``tokenizer.json``.

``CLIPTokenizer.from_directory(DIR)`` loads ``DIR/tokenizer.json`` with the ``tokenizers``
library (no transformers, no torch) and ``encode(texts, max_length=77)`` returns
``(ids, mask)``, int32 ``[N, max_length]``, equal to what transformers' ``CLIPTokenizer``
(``AutoTokenizer``) gives for ``tokenizer(texts, padding="max_length", truncation=True,
max_length=77)`` on the same directory:

* ``<|startoftext|>`` ... ``<|endoftext|>`` around every text (the post-processor stored in
  ``tokenizer.json``, a ``RobertaProcessing`` for CLIP);
* texts longer than ``max_length`` keep their first ``max_length - 2`` tokens and still end with
  ``<|endoftext|>`` (the ``tokenizers`` truncation counts the added special tokens);
* padding on the right to ``max_length`` with the pad token transformers uses: the
  ``pad_token`` of ``special_tokens_map.json`` or ``tokenizer_config.json`` (with transformers'
  precedence, see ``_configured_pad_token``), else transformers' ``CLIPTokenizer`` default
  ``<|endoftext|>``. OpenAI's checkpoints pad with
  ``<|endoftext|>`` (id 49407); LAION / Stable Diffusion 2 ones with ``!`` (id 0). ``mask`` is 1
  on real tokens (BOS, text, EOS) and 0 on padding.

The text model pools at the first ``<|endoftext|>``, so the padding id does not change the
pooled embedding, but it does change the per-token hidden states that a text-to-image model
conditions on; hence it follows the directory.

Normalisation and pre-tokenisation are whatever ``tokenizer.json`` says. transformers 5 instead
rebuilds CLIP's pipeline (NFC, whitespace runs to one space, lowercase; CLIP's split regex;
byte-level) from the vocabulary and merges and keeps only the post-processor of the file; every
CLIP ``tokenizer.json`` (OpenAI's, LAION's, the ones ``tools.make_random_clip`` writes) stores
exactly that pipeline, so the two agree.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_PAD_TOKEN = EOS_TOKEN  # transformers' CLIPTokenizer default.
DEFAULT_MAX_LENGTH = 77


def _token_content(value) -> str | None:
  """A special token as stored by transformers: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _configured_pad_token(directory: str) -> tuple[str, str]:
  """(pad token, where it came from) as transformers 5 resolves it for this directory: a
  ``tokenizer_config.json`` with ``added_tokens_decoder`` (transformers >= 4.34 saves) is the
  only source; otherwise ``special_tokens_map.json`` overrides ``tokenizer_config.json``."""
  config_path = os.path.join(directory, "tokenizer_config.json")
  map_path = os.path.join(directory, "special_tokens_map.json")
  config = _read_json(config_path) or {}
  sources = [(config, config_path)]
  if "added_tokens_decoder" not in config:
    sources.insert(0, (_read_json(map_path) or {}, map_path))
  for data, path in sources:
    pad = _token_content(data.get("pad_token"))
    if pad is not None:
      return pad, path
  return DEFAULT_PAD_TOKEN, "transformers' CLIPTokenizer default"


class CLIPTokenizer:
  """CLIP's tokenizer from ``tokenizer.json``; see the module docstring.

  Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size`` (including special tokens),
  ``directory``.
  """

  def __init__(self, tokenizer, pad_token: str, *, directory: str = ""):
    self._tokenizer = tokenizer
    self.directory = directory
    where = os.path.join(directory, TOKENIZER_FILE) if directory else "the tokenizer"
    ids = {}
    for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
      ids[token] = tokenizer.token_to_id(token)
      if ids[token] is None:
        raise ValueError(f"{where} has no token {token!r} in its vocabulary; not a CLIP "
                         "tokenizer")
    # transformers registers its special tokens (the pad token too) as added tokens, which are
    # split off the text before BPE: with pad "!", a "!" in a prompt becomes the pad id.
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys((BOS_TOKEN, EOS_TOKEN, pad_token)) if t not in added]
    if missing:
      tokenizer.add_special_tokens(missing)
    self.bos_id = ids[BOS_TOKEN]
    self.eos_id = ids[EOS_TOKEN]
    self.pad_id = ids[pad_token]
    self.pad_token = pad_token
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_directory(cls, directory: str) -> "CLIPTokenizer":
    """Loads ``directory/tokenizer.json``; the pad token as transformers picks it."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    if not os.path.isfile(path):
      present = sorted(f for f in os.listdir(directory) if f in ("vocab.json", "merges.txt"))
      raise FileNotFoundError(
          f"no {TOKENIZER_FILE} in {directory!r}" + (
              f" (it has {present}: save the tokenizer with transformers' "
              "CLIPTokenizerFast.save_pretrained to get tokenizer.json)" if present else ""))
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust error type is not importable.
      raise ValueError(f"{path} is not a tokenizers file: {e}") from None
    pad_token, _ = _configured_pad_token(directory)
    return cls(tokenizer, pad_token, directory=directory)

  def encode(self, texts: Sequence[str] | str,
             max_length: int = DEFAULT_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, int32 ``[N, max_length]``: BOS, tokens, EOS, right padding."""
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be strings; entries {bad[:5]} are "
                      f"{sorted({type(texts[i]).__name__ for i in bad})}")
    if max_length < 2:
      raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
    if not texts:
      return np.zeros((0, max_length), np.int32), np.zeros((0, max_length), np.int32)
    tok = self._tokenizer
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
    try:
      encodings = tok.encode_batch(texts)
    finally:
      tok.no_truncation()
      tok.no_padding()
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens (``</w>`` word ends become spaces)."""
    text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return text.replace("</w>", " ").strip()
