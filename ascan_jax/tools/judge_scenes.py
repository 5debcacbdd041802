"""Calibrates the compositional judge on real held-out digit scenes; writes the per-tag table.

``python -m ascan_jax.tools.judge_scenes [--judge_dir=DIR --per_tag=100
--sizes=64x64,64x96,96x64 --out=results/scenes/calibration.json]``

A judge's score on generated images means something only if it is near 1 for real images that
match their prompt and near 0 for real images that do not. For each canvas size this scores
``--per_tag`` held-out scenes of each GenEval tag three ways: with their own metadata, with
metadata contradicted (``compositional.contradict``: another class, colour, count or the
opposite relation, swapped colours), and with the metadata of another scene of the same tag
(which sometimes still holds, e.g. the same digit). The digit classifier is the one the
classification task trains (``configs/ascan_t.py:runlocal``); the default ``--judge_dir`` is where
the diffusion task keeps it, and the tool stops with the training command when it is missing.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from ascan_jax import fileio
from ascan_jax.data import digit_scenes
from ascan_jax.eval import compositional

FLAGS = flags.FLAGS
JUDGE_NAME = "embedded_mnist32_ascan_t_runlocal"


def default_judge_dir() -> str:
  """Where the diffusion ``:runlocal`` keeps its judge (``$ASCAN_CACHE``/judges/...)."""
  base = os.environ.get("ASCAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "ascan_jax")
  return os.path.join(base, "judges", JUDGE_NAME)


def load_judge(workdir: str):
  """The trained classifier of ``workdir`` (``Judge.from_workdir``).

  The judge module is moving from ``eval/`` to ``tasks/``; either place is accepted.
  """
  try:
    from ascan_jax.tasks import judge as judge_lib  # pylint: disable=g-import-not-at-top
  except ImportError:
    from ascan_jax.eval import judge as judge_lib  # pylint: disable=g-import-not-at-top
  return judge_lib.Judge.from_workdir(workdir)


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("judge_dir", default_judge_dir(),
                      "Workdir of a trained digit classifier (classification task).")
  flags.DEFINE_integer("per_tag", 100, "Held-out scenes per tag and canvas size.")
  flags.DEFINE_list("sizes", ["64x64", "64x96", "96x64"], "Canvas sizes HxW.")
  flags.DEFINE_integer("seed", 0, "Scene seed (and of the contradictions).")
  flags.DEFINE_string("out", "results/scenes/calibration.json", "JSON file to write.")


def held_out_scenes(tag: str, n: int, height: int, width: int, seed: int) -> list[dict]:
  source = digit_scenes.DigitScenesSource("validation", height=height, width=width,
                                          num_examples=n, seed=seed, tag_weights={tag: 1.0})
  return [source.load(i) for i in range(n)]


def calibrate(classify, input_size: int, per_tag: int, height: int, width: int,
              seed: int, label_smoothing: float = 0.0) -> dict:
  """Per-tag scores of held-out scenes with own, contradicted and other scenes' metadata.

  The images are detected once; each kind of metadata is then judged by GenEval's rules (the
  digit judge's thresholds; ``own_geneval_counting_threshold`` repeats ``own`` with GenEval's
  0.9 for counting prompts, for comparison).
  """
  rng = np.random.default_rng(seed)
  images, own, contradicted, other = [], [], [], []
  for tag in digit_scenes.TAGS:
    scenes = held_out_scenes(tag, per_tag, height, width, seed)
    metas = [compositional.validate_metadata(s["metadata"]) for s in scenes]
    images += [s["image"] for s in scenes]
    own += metas
    contradicted += [compositional.contradict(m, rng) for m in metas]
    other += metas[1:] + metas[:1]
  detections = compositional.detect(images, classify, input_size,
                                    label_smoothing=label_smoothing)
  kinds = (("own", own, {}), ("contradicted", contradicted, {}),
           ("other_scene_same_tag", other, {}),
           ("own_geneval_counting_threshold", own,
            {"counting_threshold": compositional.GENEVAL_COUNTING_THRESHOLD}))
  out = {}
  for name, metadata, options in kinds:
    judged = [compositional.evaluate(m, d, **options) for m, d in zip(metadata, detections)]
    correct = [ok for ok, _ in judged]
    out[name] = compositional.summarize([m["tag"] for m in metadata], correct)
    if name == "own":
      out[name]["failures"] = [{"prompt": m["prompt"], "reason": reason}
                               for m, (ok, reason) in zip(metadata, judged) if not ok][:30]
  return out


def _table(results: dict) -> str:
  lines = []
  for size, by_kind in results.items():
    lines.append(f"{size}: " + " | ".join(
        ["kind".ljust(30)] + [t[:10].ljust(10) for t in digit_scenes.TAGS] + ["overall"]))
    for kind, r in by_kind.items():
      lines.append(" " * (len(size) + 2) + " | ".join(
          [kind.ljust(30)] + [f"{r.get('geneval_' + t, float('nan')):.3f}".ljust(10)
                              for t in digit_scenes.TAGS] + [f"{r['geneval_overall']:.3f}"]))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    judge = load_judge(FLAGS.judge_dir)
  except FileNotFoundError as e:
    raise app.UsageError(f"{e}\nTrain it with: python main.py "
                         f"--config=configs/ascan_t.py:runlocal --workdir={FLAGS.judge_dir}")

  def classify(crops):
    return judge.predict(crops)[0]

  label_smoothing = float(judge.task.config.get("label_smoothing", 0.0))
  results = {}
  for size in FLAGS.sizes:
    try:
      height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
      raise app.UsageError(f"--sizes entries look like 64x96 (HxW), got {size!r}") from None
    results[size] = calibrate(classify, judge.image_size, FLAGS.per_tag, height, width,
                              FLAGS.seed, label_smoothing)
  report = {"judge_dir": FLAGS.judge_dir, "judge_step": judge.step,
            "judge_label_smoothing": label_smoothing,
            "thresholds": {"threshold": compositional.GENEVAL_THRESHOLD,
                           "counting_threshold": compositional.COUNTING_THRESHOLD,
                           "position_threshold": compositional.GENEVAL_POSITION_THRESHOLD},
            "per_tag": FLAGS.per_tag, "seed": FLAGS.seed, "split": "validation",
            "results": results}
  folder = os.path.dirname(FLAGS.out)
  if folder:
    fileio.makedirs(folder)
  fileio.write_text(FLAGS.out, json.dumps(report, indent=1) + "\n")
  print(_table(results))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
