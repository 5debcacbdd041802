"""Writes a small random-weight T5 encoder directory in transformers' layout, without torch.

``python -m ascan_jax.tools.make_random_t5 --out=DIR [--corpus=FILE] [--vocab_size=256
--d_model=64 --d_kv=16 --d_ff=128 --num_layers=2 --num_heads=4 --feed_forward_proj=gated-gelu
--seed=0]``

The files are ``models.t5_random``'s (shared with the text-to-image task's stand-in). DIR gets
what a Flan-T5 download holds, at toy size: ``spiece.model`` (a sentencepiece unigram
model with T5's special ids pad 0, EOS 1, unk 2 and no BOS, trained on ``--corpus``, one caption
a line, or on a built-in corpus of generated captions), ``config.json`` (a ``T5EncoderModel``)
and ``model.safetensors`` (or shards with an index, ``--max_shard_bytes``). The weights come
from ``models.t5``'s initialisers, which are transformers' (normal, std scaled per weight kind),
seeded by ``--seed``. The model's ``vocab_size`` is the sentencepiece vocabulary plus T5's 100
sentinels, rounded up to a multiple of 128 as Flan-T5's 32128 is. It is the stand-in for
Flan-T5-XXL in CPU demos and tests (nothing can be downloaded there): ``models.t5``,
``data.t5_tokenizer``, ``tools.encode_text`` and transformers all load it; its embeddings carry
no meaning. ``--vocab_size`` is an upper bound: a small corpus yields fewer pieces.
"""
from __future__ import annotations

import itertools
import os

from absl import app
from absl import flags
import jax

from ascan_jax.models import t5
from ascan_jax.models import t5_random
from ascan_jax.models.t5_random import train_spiece  # pylint: disable=unused-import (re-export)

FLAGS = flags.FLAGS

# The built-in corpus: every combination of these, a few hundred caption-like lines.
_STYLES = ("a photo of", "a painting of", "a watercolor of", "a sketch of", "a 3d render of",
           "a close-up photo of")
_SUBJECTS = ("a red cat", "two small dogs", "an old wooden boat", "a tall glass tower",
             "a yellow bicycle", "a snowy mountain", "a bowl of fruit", "an astronaut",
             "a green parrot", "three children")
_PLACES = ("on a beach at sunset", "in a busy city street", "under a blue sky",
           "next to a quiet lake", "in a dark forest", "on a kitchen table")


def default_corpus() -> list[str]:
  return [f"{style} {subject} {place}" for style, subject, place
          in itertools.product(_STYLES, _SUBJECTS, _PLACES)]


def read_corpus(path: str) -> list[str]:
  """Non-empty lines of a UTF-8 text file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file {path} not found")
  with open(path, encoding="utf-8") as f:
    try:
      lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
      raise ValueError(f"corpus file {path} is not UTF-8 text: {e}") from None
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f"corpus file {path} has no text")
  return lines


def make_random_t5(out: str, *, lines: list[str] | None = None, **kwargs) -> t5.T5Config:
  """``models.t5_random.make_random_t5`` with the built-in corpus when ``lines`` is None."""
  return t5_random.make_random_t5(out, lines=lines or default_corpus(), **kwargs)


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("out", None, "Output directory (created if needed).")
  flags.DEFINE_string("corpus", None, "UTF-8 text file, one caption a line, to train the "
                      "sentencepiece model on (default: a built-in caption corpus).")
  flags.DEFINE_integer("vocab_size", 256, "Sentencepiece vocabulary size (an upper bound).")
  flags.DEFINE_integer("d_model", 64, "Width of the residual stream.")
  flags.DEFINE_integer("d_kv", 16, "Width of one attention head.")
  flags.DEFINE_integer("d_ff", 128, "Width of the feed-forward layer.")
  flags.DEFINE_integer("num_layers", 2, "Encoder blocks.")
  flags.DEFINE_integer("num_heads", 4, "Attention heads.")
  flags.DEFINE_string("feed_forward_proj", "gated-gelu", "gated-gelu (T5 v1.1 / Flan), relu "
                      "(original T5) or gated-silu.")
  flags.DEFINE_integer("relative_attention_num_buckets", 32, "Relative position buckets.")
  flags.DEFINE_integer("relative_attention_max_distance", 128, "Distance of the last bucket.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the initialisers.")
  flags.DEFINE_integer("max_shard_bytes", None, "Write sharded safetensors of at most this "
                       "many bytes each, with an index (default: one file).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")  # the convention of main.py and tests.
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    lines = read_corpus(FLAGS.corpus) if FLAGS.corpus else None
    config = make_random_t5(
        FLAGS.out, lines=lines, vocab_size=FLAGS.vocab_size, seed=FLAGS.seed,
        max_shard_bytes=FLAGS.max_shard_bytes, d_model=FLAGS.d_model, d_kv=FLAGS.d_kv,
        d_ff=FLAGS.d_ff, num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads,
        feed_forward_proj=FLAGS.feed_forward_proj,
        relative_attention_num_buckets=FLAGS.relative_attention_num_buckets,
        relative_attention_max_distance=FLAGS.relative_attention_max_distance)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(f"wrote a random T5 encoder to {FLAGS.out}: {config.describe()}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
