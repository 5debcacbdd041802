"""Writes a small random-weight CLIPModel directory in Hugging Face's layout, without torch.

``python -m ascan_jax.tools.make_random_clip --out=DIR [--preset=tiny|vit_b32|vit_l14
--text_layers=N --vision_layers=N --num_merges=400 --captions=FILE --seed=0]``

No pretrained CLIP can be downloaded here, so tests and CPU demos use one of these. DIR gets
what a real ``openai/clip-vit-*`` directory has, and transformers' ``CLIPModel`` /
``CLIPProcessor`` / ``AutoTokenizer`` load it (``tests/test_clip.py`` checks):

* ``config.json`` (``CLIPConfig.to_hf_dict``) and ``model.safetensors`` (float32, torch names and
  layouts), initialised from a seeded numpy generator the way transformers' ``CLIPModel``
  initialises itself (``_init_weights``: normal embeddings with std 0.02, class token
  ``D**-0.5``, attention inputs ``D**-0.5 (2 L)**-0.5``, outputs ``D**-0.5``, ``fc1``
  ``(2 D)**-0.5``, ``fc2`` ``D**-0.5 (2 L)**-0.5``, projections ``D**-0.5``, zero biases, unit
  LayerNorms, ``logit_scale = logit_scale_init_value``);
* ``preprocessor_config.json``: CLIP's image preprocessing for the model's image size;
* a CLIP-style byte-level BPE tokenizer trained with the ``tokenizers`` library on a small
  caption corpus (generated from templates, or ``--captions``, one caption a line), with CLIP's
  normalisation (NFC, whitespace runs to one space, lowercase), CLIP's split regex, byte-level
  symbols with the ``</w>`` end-of-word suffix, and ``<|startoftext|>`` / ``<|endoftext|>``
  added by a ``RobertaProcessing`` post-processor. The vocabulary is laid out as CLIP's: the 256
  byte symbols, the same with ``</w>``, one entry per merge in merge order, then BOS and EOS
  (the two largest ids). Saved as ``tokenizer.json`` plus ``vocab.json`` / ``merges.txt`` /
  ``tokenizer_config.json`` / ``special_tokens_map.json`` (pad token ``<|endoftext|>``, as
  OpenAI's). The text tower's ``vocab_size`` and ``eos_token_id`` follow the tokenizer.

Presets: ``tiny`` (32x32 images, patch 8, widths 64, 2 layers per tower, projection 32) for demos;
``vit_b32`` and ``vit_l14`` have every dimension of OpenAI's ViT-B/32 and ViT-L/14 (only the
vocabulary is small); ``--text_layers`` / ``--vision_layers`` cut their depth.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Iterable, Sequence

import numpy as np
import safetensors.numpy
from absl import app
from absl import flags
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from ascan_jax.data import clip_tokenizer
from ascan_jax.models import clip

FLAGS = flags.FLAGS
WEIGHTS_NAME = "model.safetensors"
CLIP_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"

PRESETS = {
    "tiny": clip.CLIPConfig(
        text=clip.CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4),
        vision=clip.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32),
    # OpenAI's openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14 shapes.
    "vit_b32": clip.CLIPConfig(
        text=clip.CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=8),
        vision=clip.CLIPVisionConfig(hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     image_size=224, patch_size=32),
        projection_dim=512),
    "vit_l14": clip.CLIPConfig(
        text=clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12),
        vision=clip.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16,
                                     image_size=224, patch_size=14),
        projection_dim=768),
}

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey")
_THINGS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "cat", "dog", "house", "tree", "car", "bird", "flower", "boat", "mountain", "apple")
_SCENES = ("a photo of a {c} {t}", "a drawing of the {c} {t}", "a {c} {t} on a table",
           "two {c} {t}s in the snow", "a close-up picture of a {c} {t}, digital art",
           "the {t} is {c}!", "an oil painting of a {c} {t} at sunset")


def template_captions() -> list[str]:
  """A deterministic caption corpus (colours x things x scenes), 1260 captions."""
  return [s.format(c=c, t=t) for s, c, t in itertools.product(_SCENES, _COLOURS, _THINGS)]


def _byte_symbols() -> list[str]:
  """The 256 byte-level symbols in CLIP's order (GPT-2's byte-to-unicode map sorted by code
  point puts the printable bytes first, then the remapped ones, as CLIP's vocabulary does)."""
  return sorted(pre_tokenizers.ByteLevel.alphabet())


def _clip_pipeline(tokenizer) -> None:
  tokenizer.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = decoders.ByteLevel()


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
  return models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                    end_of_word_suffix=END_OF_WORD, unk_token=clip_tokenizer.EOS_TOKEN,
                    fuse_unk=False)


def build_tokenizer(captions: Iterable[str], num_merges: int = 400):
  """A CLIP-style BPE ``tokenizers.Tokenizer`` trained on ``captions`` (module docstring)."""
  special = [clip_tokenizer.BOS_TOKEN, clip_tokenizer.EOS_TOKEN]
  base = _byte_symbols()
  symbols = base + [s + END_OF_WORD for s in base]
  trainer_tok = Tokenizer(_bpe({}, []))
  _clip_pipeline(trainer_tok)
  trainer = trainers.BpeTrainer(
      vocab_size=len(symbols) + num_merges + len(special), min_frequency=1,
      special_tokens=special, initial_alphabet=base, end_of_word_suffix=END_OF_WORD,
      show_progress=False)
  trainer_tok.train_from_iterator(list(captions), trainer)
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(trainer_tok.to_str())["model"]["merges"]][:num_merges]
  vocab: dict[str, int] = {}
  for token in symbols + ["".join(m) for m in merges] + special:
    vocab.setdefault(token, len(vocab))
  tokenizer = Tokenizer(_bpe(vocab, merges))
  _clip_pipeline(tokenizer)
  tokenizer.add_special_tokens(special)
  tokenizer.post_processor = processors.RobertaProcessing(
      (clip_tokenizer.EOS_TOKEN, vocab[clip_tokenizer.EOS_TOKEN]),
      (clip_tokenizer.BOS_TOKEN, vocab[clip_tokenizer.BOS_TOKEN]),
      trim_offsets=False, add_prefix_space=False)
  return tokenizer


def save_tokenizer(tokenizer, out: str, max_length: int = 77) -> None:
  """``tokenizer.json`` plus the files transformers' CLIP tokenizer classes read."""
  tokenizer.save(os.path.join(out, clip_tokenizer.TOKENIZER_FILE))
  model = json.loads(tokenizer.to_str())["model"]
  with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(model["vocab"], f, ensure_ascii=False)
  with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    for m in model["merges"]:
      f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
  special = {"bos_token": clip_tokenizer.BOS_TOKEN, "eos_token": clip_tokenizer.EOS_TOKEN,
             "unk_token": clip_tokenizer.EOS_TOKEN, "pad_token": clip_tokenizer.EOS_TOKEN}
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=max_length,
                   do_lower_case=True, errors="replace", add_prefix_space=False), f, indent=2)


def _init_std(name: str, config: clip.CLIPConfig) -> float | None:
  """transformers' CLIP ``_init_weights`` std of a weight (None: zeros / ones / a constant)."""
  tower = config.text if name.startswith("text_model.") else config.vision
  d, layers = tower.hidden_size, tower.num_hidden_layers
  if name.endswith(".bias") or "norm" in name or "layrnorm" in name or name == "logit_scale":
    return None
  if name.endswith("class_embedding"):
    return d ** -0.5
  if "embeddings." in name:
    return 0.02  # token, position and patch embeddings (initializer_range = 0.02).
  if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
    return d ** -0.5 * (2 * layers) ** -0.5
  if name.endswith("out_proj.weight"):
    return d ** -0.5
  if name.endswith("fc1.weight"):
    return (2 * d) ** -0.5
  if name.endswith("fc2.weight"):
    return d ** -0.5 * (2 * layers) ** -0.5
  if name == "text_projection.weight":
    return config.text.hidden_size ** -0.5
  if name == "visual_projection.weight":
    return config.vision.hidden_size ** -0.5
  raise ValueError(f"no initialisation rule for {name}")


def random_state_dict(config: clip.CLIPConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """transformers-style random float32 weights for ``config``, by transformers name."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in sorted(clip.hf_shapes(config).items()):
    std = _init_std(name, config)
    if std is not None:
      value = rng.standard_normal(shape) * std
    elif name == "logit_scale":
      value = np.full(shape, config.logit_scale_init_value)
    elif name.endswith(".weight"):  # LayerNorm scales.
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    out[name] = value.astype(np.float32)
  return out


def make_random_clip(out: str, config: clip.CLIPConfig, seed: int = 0,
                     captions: Sequence[str] | None = None,
                     num_merges: int = 400) -> clip.CLIPConfig:
  """Writes the directory (module docstring); returns the config written (its text tower's
  ``vocab_size`` / token ids set from the tokenizer)."""
  os.makedirs(out, exist_ok=True)
  tokenizer = build_tokenizer(captions if captions is not None else template_captions(),
                              num_merges)
  text = dataclasses.replace(
      config.text, vocab_size=tokenizer.get_vocab_size(),
      bos_token_id=tokenizer.token_to_id(clip_tokenizer.BOS_TOKEN),
      eos_token_id=tokenizer.token_to_id(clip_tokenizer.EOS_TOKEN))
  config = dataclasses.replace(config, text=text, image_processing=None)
  save_tokenizer(tokenizer, out, config.text.max_position_embeddings)
  with open(os.path.join(out, clip.CONFIG_NAME), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2, sort_keys=True)
    f.write("\n")
  with open(os.path.join(out, clip.PREPROCESSOR_CONFIG_NAME), "w") as f:
    json.dump(config.preprocessor_dict(), f, indent=2, sort_keys=True)
    f.write("\n")
  # Not hf_checkpoint.save_safetensors: its np.ascontiguousarray turns the 0-d logit_scale into
  # shape [1], which transformers refuses.
  safetensors.numpy.save_file(random_state_dict(config, seed), os.path.join(out, WEIGHTS_NAME),
                              metadata={"format": "pt"})
  return config


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("out", None, "Output directory (created if needed).")
  flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "Model shape.")
  flags.DEFINE_integer("text_layers", None, "Text tower depth (default: the preset's).")
  flags.DEFINE_integer("vision_layers", None, "Vision tower depth (default: the preset's).")
  flags.DEFINE_integer("num_merges", 400, "BPE merges learnt from the captions.")
  flags.DEFINE_string("captions", None, "Text file of captions, one a line (default: built-in).")
  flags.DEFINE_integer("seed", 0, "Seed of the numpy generator of the weights.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = PRESETS[FLAGS.preset]
  try:
    if FLAGS.text_layers is not None:
      config = dataclasses.replace(config, text=dataclasses.replace(
          config.text, num_hidden_layers=FLAGS.text_layers))
    if FLAGS.vision_layers is not None:
      config = dataclasses.replace(config, vision=dataclasses.replace(
          config.vision, num_hidden_layers=FLAGS.vision_layers))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  captions = None
  if FLAGS.captions:
    with open(FLAGS.captions, encoding="utf-8") as f:
      captions = [line.strip() for line in f if line.strip()]
    if not captions:
      raise app.UsageError(f"{FLAGS.captions} holds no captions")
  config = make_random_clip(FLAGS.out, config, FLAGS.seed, captions, FLAGS.num_merges)
  print(f"wrote a random CLIPModel ({FLAGS.preset}, text vocabulary {config.text.vocab_size}) "
        f"to {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
