"""CLIP score of a sample directory written by the text-to-image ``--mode=sample``.

``python -m ascan_jax.tools.clip_score --clip=DIR --samples=SAMPLE_DIR [--output=FILE.json
--batch_size=64]``

``SAMPLE_DIR/protocol.json`` is a JSON object whose ``samples`` list holds one entry per image,
``{"file": "images/00000_seed0.png", "prompt": "a red seven", "prompt_index": 0, "seed": 0}``,
with files relative to SAMPLE_DIR (other protocol keys are ignored here). Every image is scored
against its own prompt with ``eval.clip_score.CLIPScorer`` (the CLIP ``Model`` directory
``--clip``, no torch): per image ``100 * max(cos, 0)``, averaged per prompt (entries with the
same ``prompt_index``, or the same prompt text when there is none) and overall. The result is
printed and written as JSON to ``--output`` (default ``SAMPLE_DIR/clip_score.json``) with the
CLIP directory, the sha256 of its ``config.json`` and the path of the protocol it scored.

Before any model is loaded, a directory without ``protocol.json``, a malformed protocol, or a
listed image that is missing says so in one line naming the file and exits with status 2; an
image that does not decode does the same when it is reached (the first batch of images is
decoded before the model loads). Images are read with PIL and
converted to RGB, in batches (never all at once); images of different sizes are scored in
separate batches.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator

import numpy as np
from absl import app
from absl import flags

FLAGS = flags.FLAGS
PROTOCOL_NAME = "protocol.json"
DEFAULT_OUTPUT_NAME = "clip_score.json"


class SampleDirError(ValueError):
  """A sample directory that cannot be scored; the message names the file and the problem."""


def read_protocol(samples_dir: str) -> tuple[str, list[dict[str, Any]]]:
  """``(path of protocol.json, its samples)``, checked: every entry has a ``file`` that exists
  and a string ``prompt``."""
  if not os.path.isdir(samples_dir):
    raise SampleDirError(f"sample directory {samples_dir} does not exist")
  path = os.path.join(samples_dir, PROTOCOL_NAME)
  if not os.path.isfile(path):
    raise SampleDirError(f"{samples_dir} has no {PROTOCOL_NAME}; it is not a sample directory "
                         "written by the text-to-image --mode=sample")
  try:
    with open(path) as f:
      protocol = json.load(f)
  except json.JSONDecodeError as e:
    raise SampleDirError(f"{path} is not valid JSON: {e}") from None
  samples = protocol.get("samples") if isinstance(protocol, dict) else None
  if not isinstance(samples, list) or not samples:
    raise SampleDirError(f"{path} has no non-empty 'samples' list")
  missing = []
  for i, s in enumerate(samples):
    if not isinstance(s, dict) or not isinstance(s.get("file"), str) or \
        not isinstance(s.get("prompt"), str):
      raise SampleDirError(f"{path}: samples[{i}] needs a string 'file' and a string 'prompt', "
                           f"got {s!r}")
    if not os.path.isfile(os.path.join(samples_dir, s["file"])):
      missing.append(os.path.join(samples_dir, s["file"]))
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise SampleDirError(f"image {missing[0]}{more} listed in {path} does not exist")
  return path, samples


def _read_image(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...).
    raise SampleDirError(f"image {path} cannot be decoded: {type(e).__name__}: {e}") from None


def _chunks(samples_dir: str, samples: list[dict],
            size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
  for lo in range(0, len(samples), size):
    yield [(i, _read_image(os.path.join(samples_dir, samples[i]["file"])))
           for i in range(lo, min(lo + size, len(samples)))]


def score_samples(clip_dir: str, samples_dir: str, samples: list[dict],
                  batch_size: int = 64) -> tuple[np.ndarray, float, Any]:
  """Per-sample CLIP scores in protocol order, 100 x the mean cosine, and the scorer. The model
  is loaded after the first images decode, so a broken first image fails fast."""
  from ascan_jax.eval import clip_score  # pylint: disable=g-import-not-at-top
  per_sample = np.zeros(len(samples), np.float64)
  cos_sum, scorer = 0.0, None
  for chunk in _chunks(samples_dir, samples, 4 * batch_size):
    scorer = scorer or clip_score.CLIPScorer(clip_dir, batch_size=batch_size)
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, image in chunk:
      by_shape.setdefault(image.shape, []).append((i, image))
    for group in by_shape.values():
      idx = [i for i, _ in group]
      result = scorer.score(np.stack([im for _, im in group]),
                            [samples[i]["prompt"] for i in idx])
      per_sample[idx] = result["per_sample"]
      cos_sum += float(result["cosine"].sum())
  return per_sample, 100.0 * cos_sum / len(samples), scorer


def summarise(samples: list[dict], per_sample: np.ndarray) -> list[dict[str, Any]]:
  """Per-prompt means, in order of first appearance."""
  groups: dict[Any, list[int]] = {}
  for i, s in enumerate(samples):
    groups.setdefault(s.get("prompt_index", s["prompt"]), []).append(i)
  return [{"prompt_index": samples[idx[0]].get("prompt_index"),
           "prompt": samples[idx[0]]["prompt"], "num_images": len(idx),
           "clip_score": float(per_sample[idx].mean())} for idx in groups.values()]


def run(clip_dir: str, samples_dir: str, output: str | None = None,
        batch_size: int = 64) -> dict[str, Any]:
  """Scores ``samples_dir`` with ``clip_dir``; writes and returns the result (module doc)."""
  protocol_path, samples = read_protocol(samples_dir)
  per_sample, mean_cos100, scorer = score_samples(clip_dir, samples_dir, samples, batch_size)
  result = {
      "clip_score": float(per_sample.mean()),
      "torchmetrics_clip_score": float(max(mean_cos100, 0.0)),
      "mean_cosine": mean_cos100 / 100.0,  # unclamped; informative for random test models.
      "num_samples": len(samples),
      "per_prompt": summarise(samples, per_sample),
      "per_sample": [{"file": s["file"], "prompt_index": s.get("prompt_index"),
                      "seed": s.get("seed"), "clip_score": float(v)}
                     for s, v in zip(samples, per_sample)],
      "protocol": os.path.abspath(protocol_path),
      **scorer.protocol(),
  }
  result["clip_dir"] = os.path.abspath(clip_dir)
  output = output or os.path.join(samples_dir, DEFAULT_OUTPUT_NAME)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  result["output"] = output
  return result


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("clip", None, "Hugging Face CLIPModel directory (config.json, "
                      "safetensors, tokenizer.json).")
  flags.DEFINE_string("samples", None, "Sample directory with protocol.json.")
  flags.DEFINE_string("output", None, f"Result JSON (default SAMPLES/{DEFAULT_OUTPUT_NAME}).")
  flags.DEFINE_integer("batch_size", 64, "Image-prompt pairs per jitted batch.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")  # the convention of main.py and tests.
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    result = run(FLAGS.clip, FLAGS.samples, FLAGS.output, FLAGS.batch_size)
  except (SampleDirError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for p in result["per_prompt"]:
    print(f"  {p['clip_score']:8.4f}  ({p['num_images']} images)  "
          f"[{p['prompt_index']}] {p['prompt']}")
  print(f"CLIP score {result['clip_score']:.4f} over {result['num_samples']} images, "
        f"{len(result['per_prompt'])} prompts (CLIP {result['clip_dir']}, config sha256 "
        f"{result['clip_config_sha256'][:12]}); written to {result['output']}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["clip", "samples"])
  app.run(main)
