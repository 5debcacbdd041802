"""Random-weight T5 encoder directories in transformers' layout: the stand-in for Flan-T5-XXL.

``make_random_t5(out, lines=..., vocab_size=..., seed=..., **T5Config fields)`` writes what a
Flan-T5 download holds, at toy size: ``spiece.model`` (sentencepiece trained on ``lines`` with
T5's special ids pad 0, EOS 1, unk 2 and no BOS), ``config.json`` (a ``T5EncoderModel``) and
``model.safetensors`` (or shards with an index). The weights come from ``models.t5``'s
initialisers (transformers': normal, std scaled per weight kind), seeded by ``seed``; the model's
``vocab_size`` is the sentencepiece vocabulary rounded up to a multiple of 128, as Flan-T5's
32128 is. Its embeddings carry no meaning. Used by ``tools.make_random_t5`` (the command) and by
the text-to-image task, which writes one trained on its captions when ``text.encoder_dir`` is
missing (tasks cannot import tools).
"""
from __future__ import annotations

import io
import os

import jax

from ascan_jax.data import t5_tokenizer
from ascan_jax.models import t5

VOCAB_MULTIPLE = 128
TOKENIZER_TYPES = ("unigram", "word", "bpe")


def train_spiece(lines: list[str], vocab_size: int, model_type: str = "unigram") -> bytes:
  """A serialized sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2, no BOS).
  ``model_type``: ``unigram`` (T5's), ``word`` (one piece per word of a small vocabulary) or
  ``bpe``."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  if model_type not in TOKENIZER_TYPES:
    raise ValueError(f"tokenizer model_type {model_type!r} is not one of {TOKENIZER_TYPES}")
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.Train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return model.getvalue()


def make_random_t5(out: str, *, lines: list[str], vocab_size: int = 256, seed: int = 0,
                   tokenizer_type: str = "unigram", max_shard_bytes: int | None = None,
                   **config_kwargs) -> t5.T5Config:
  """Writes ``spiece.model``, ``config.json`` and the weights to ``out``; returns the config.
  ``config_kwargs`` are ``T5Config`` fields (``vocab_size`` is derived from the tokenizer;
  ``feed_forward_proj`` defaults to Flan-T5's ``gated-gelu``)."""
  config_kwargs.setdefault("feed_forward_proj", "gated-gelu")
  if vocab_size < 4:
    raise ValueError(f"vocab_size must be at least 4 (pad, EOS, unk and one piece), got "
                     f"{vocab_size}")
  t5.T5Config(**config_kwargs)  # bad sizes fail before anything is written.
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, t5_tokenizer.SPIECE_NAME), "wb") as f:
    f.write(train_spiece(lines, vocab_size, tokenizer_type))
  tokenizer = t5_tokenizer.T5Tokenizer(os.path.join(out, t5_tokenizer.SPIECE_NAME))
  model_vocab = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  config = t5.T5Config(vocab_size=model_vocab, **config_kwargs)
  params = t5.init_params(t5.T5Encoder(config), jax.random.key(seed))
  t5.save_pretrained(out, config, params, max_shard_bytes=max_shard_bytes)
  return config
