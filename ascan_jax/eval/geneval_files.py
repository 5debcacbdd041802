"""GenEval's own files (djghosh13/geneval): its prompt metadata and its evaluator's results.

* ``read_metadata(path)``: GenEval's ``prompts/evaluation_metadata.jsonl``, one JSON object a
  line; prompt ``i`` is line ``i + 1`` (GenEval's ``generation/diffusers_generate.py`` numbers
  them so). Each line is checked with ``compositional.validate_metadata`` (``tag``, ``include``,
  ``prompt`` required, ``exclude`` optional; classes and colours not restricted: GenEval's are
  COCO's 80 classes and its own colour names). An empty line, a line that is not JSON or a missing
  key raises ``compositional.MetadataError`` naming the file, the line number and the key, so a
  bad file fails before any sampling.
* ``read_results(path)``: ``evaluation/evaluate_images.py``'s ``--outfile`` (one JSON object per
  image with at least ``tag`` and ``correct``); ``scores(rows)``: GenEval's
  ``summary_scores.py`` convention, accuracy per tag and their mean as the overall score
  (``geneval/<tag>``, ``geneval/overall``).
"""
from __future__ import annotations


from ascan_jax import fileio
from ascan_jax.eval import compositional

MetadataError = compositional.MetadataError


def read_metadata(path: str) -> list[tuple[str, dict]]:
  """``(line text, metadata dict)`` per line of a GenEval metadata file (module docstring)."""
  if not fileio.exists(path):
    raise MetadataError(f"GenEval metadata file {path} not found")
  text = fileio.read_text(path)
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines = lines[:-1]
  out = []
  for number, line in enumerate(lines, 1):
    line = line.rstrip("\r")
    if not line.strip():
      raise MetadataError(f"{path}: line {number} is empty (GenEval numbers the prompts by "
                          "line; one JSON object a line)")
    try:
      out.append((line.strip(), compositional.validate_metadata(line, index=number)))
    except MetadataError as e:
      raise MetadataError(f"{path}: {e}") from None
  if not out:
    raise MetadataError(f"{path} holds no prompt")
  return out


def read_results(path: str) -> list[dict]:
  """The per-image rows of GenEval's ``results.jsonl``; a row without ``tag`` or a boolean
  ``correct`` names the line."""
  if not fileio.exists(path):
    raise ValueError(f"GenEval results file {path} not found")
  rows = []
  for number, row in fileio.json_lines(path):
    for key in ("tag", "correct"):
      if key not in row:
        raise ValueError(f"{path}: line {number} misses key {key!r} (GenEval's results rows "
                         "have tag and correct)")
    if not isinstance(row["correct"], bool):
      raise ValueError(f"{path}: line {number}: key 'correct' is {row['correct']!r}, not a "
                       "boolean")
    rows.append(row)
  if not rows:
    raise ValueError(f"{path} holds no result")
  return rows


def scores(rows: list[dict]) -> dict[str, float]:
  """``geneval/<tag>`` (accuracy over the tag's images), ``geneval/overall`` (mean of the
  per-tag accuracies) and ``geneval/num_images``."""
  summary = compositional.summarize([r["tag"] for r in rows], [r["correct"] for r in rows])
  out = {f"geneval/{tag}": float(summary[f"geneval_{tag}"]) for tag in summary["counts"]}
  out["geneval/overall"] = float(summary["geneval_overall"])
  out["geneval/num_images"] = float(len(rows))
  return out
