"""Multiply-accumulates counted from an XLA program's HLO text.

Every ``convolution`` and ``dot`` instruction (also those inside fusions) contributes
``output elements x contraction size``: for a convolution the contraction is the kernel's
elements divided by its output features (so grouped/depthwise convolutions are right), for a dot
the product of the left operand's contracting dimensions. Attention's ``q k^T`` and ``p v`` are
dots, so they count. Elementwise work (GELU, softmax, normalisation) is not a MAC and is left out;
XLA's own ``cost_analysis()['flops']`` (which includes it) is reported beside it as a check.
"""
from __future__ import annotations

import math
import re

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+(\w[\w\-]*)\((.*)$")
_OPERANDS = re.compile(r"%?([\w.\-]+)")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _attr(line: str, key: str) -> str | None:
  m = re.search(key + r"=\{?([^}\s,]*(?:,[^}\s]*)*)\}?", line)
  return m.group(1) if m else None


def count_macs(hlo_text: str) -> dict[str, int]:
  """``{'conv': ..., 'dot': ..., 'total': ...}`` MACs of the HLO module text."""
  shapes: dict[str, list[int]] = {}
  ops = []
  for line in hlo_text.splitlines():
    m = _DEF.match(line)
    if not m:
      continue
    name, _, dims, opcode, rest = m.groups()
    shapes[name] = _dims(dims)
    if opcode in ("convolution", "dot"):
      ops.append((opcode, _dims(dims), rest))
  if "while(" in hlo_text:
    raise ValueError("the program has a while loop (lax.scan?); its body would be counted once")
  totals = {"conv": 0, "dot": 0}
  for opcode, out_dims, rest in ops:
    operands = [o for o in _OPERANDS.findall(rest.split(")")[0])]
    lhs, rhs = operands[0], operands[1]
    out = math.prod(out_dims)
    if opcode == "convolution":
      labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
      kernel = shapes[rhs]
      totals["conv"] += out * math.prod(kernel) // kernel[labels.index("o")]
    else:
      contracting = _attr(rest, "lhs_contracting_dims")
      lhs_shape = shapes[lhs]
      k = math.prod(lhs_shape[int(i)] for i in contracting.split(",")) if contracting else 1
      totals["dot"] += out * k
  totals["total"] = totals["conv"] + totals["dot"]
  return totals
