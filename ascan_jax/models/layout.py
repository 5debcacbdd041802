"""Block-layout strings such as ``C-CCCT-CCTT-CTTT``.

A layout names the block type of every block, stage by stage: ``C`` is a convolution block
(FusedMBConv), ``T`` a transformer block (global attention), ``-`` separates stages. The
paper's ablations (symmetric vs asymmetric distributions, T before C; arXiv 2411.04967
Tables 2 and 9) are therefore config values, not code edits.
"""
from __future__ import annotations

BLOCK_TYPES = ("C", "T")
STAGE_SEPARATOR = "-"


class LayoutError(ValueError):
  """A layout string that cannot be parsed."""


def parse_layout(layout: str, num_stages: int | None = None) -> tuple[str, ...]:
  """Splits ``layout`` into one string per stage, e.g. ``('C', 'CCCT', 'CCTT', 'CTTT')``.

  Raises LayoutError naming the bad character and its position, an empty stage, or a stage
  count that differs from ``num_stages``.
  """
  if not isinstance(layout, str):
    raise LayoutError(f"layout must be a string like 'C-CCCT-CCTT-CTTT', got {layout!r}")
  text = layout.strip()
  for pos, ch in enumerate(text):
    if ch.upper() in BLOCK_TYPES and ch not in BLOCK_TYPES:
      # Refused rather than upper-cased: one spelling of a layout everywhere (configs, parameter
      # names such as stage2_block4_T, summaries), so runs compare by their strings.
      raise LayoutError(f"layout {layout!r}: lower-case {ch!r} at position {pos}; block letters "
                        f"are upper-case ('C', 'T'): write {text.upper()!r}")
    if ch not in BLOCK_TYPES and ch != STAGE_SEPARATOR:
      raise LayoutError(
          f"layout {layout!r}: bad character {ch!r} at position {pos}; "
          f"use 'C' (convolution block), 'T' (transformer block) and '-' between stages")
  stages = tuple(text.split(STAGE_SEPARATOR))
  for i, stage in enumerate(stages):
    if not stage:
      raise LayoutError(f"layout {layout!r}: stage {i + 1} is empty (two '-' in a row, or a "
                        "'-' at either end)")
  if num_stages is not None and len(stages) != num_stages:
    raise LayoutError(f"layout {layout!r} has {len(stages)} stages but {num_stages} stage "
                      f"widths are configured")
  return stages


def count_blocks(stages: tuple[str, ...]) -> dict[str, int]:
  """Number of C and T blocks over all stages."""
  joined = "".join(stages)
  return {b: joined.count(b) for b in BLOCK_TYPES}
