"""GenEval's scores into a run's ``metrics.jsonl``.

    python -m ascan_jax.tools.geneval_scores --results=OUT/results.jsonl --workdir=DIR [--step=N]

``--results`` is the ``--outfile`` of GenEval's ``evaluation/evaluate_images.py`` run on the
folder ``--mode=geneval`` wrote (``tasks.text_to_image_geneval``). One line is appended to
``DIR/metrics.jsonl``: ``step``, ``geneval/<tag>`` (accuracy over the tag's images),
``geneval/overall`` (the mean of the per-tag accuracies, GenEval's ``summary_scores.py``),
``geneval/num_images`` and ``geneval/results`` (the file). The step is ``--step``, else the
``checkpoint_step`` of the ``protocol.json`` next to the results file.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from ascan_jax import fileio
from ascan_jax.eval import geneval_files


def record(results: str, workdir: str, step: int | None = None) -> dict:
  """The metrics line appended to ``workdir/metrics.jsonl`` (module docstring)."""
  rows = geneval_files.read_results(results)
  if step is None:
    protocol = os.path.join(os.path.dirname(results), "protocol.json")
    if not fileio.exists(protocol):
      raise ValueError(f"no --step and no {protocol} (written by --mode=geneval) to read the "
                       "checkpoint step from")
    step = int(json.loads(fileio.read_text(protocol))["checkpoint_step"])
  line = {"step": int(step), **geneval_files.scores(rows), "geneval/results": results}
  fileio.makedirs(workdir)
  fileio.append_line(fileio.join(workdir, "metrics.jsonl"), json.dumps(line))
  return line


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("results", None, "GenEval's results.jsonl (evaluate_images.py --outfile)")
  flags.DEFINE_string("workdir", None, "the run whose metrics.jsonl gets the scores")
  flags.DEFINE_integer("step", None, "checkpoint step (default: from protocol.json)")
  flags.mark_flags_as_required(["results", "workdir"])


def main(argv):
  del argv
  try:
    line = record(FLAGS.results, FLAGS.workdir, FLAGS.step)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for key, value in line.items():
    print(f"{key:28s} {value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
