"""Where the time of a jitted program goes: a ``jax.profiler`` trace summarised by op type.

``profile_call(fn, compiled_text, steps, trace_dir)`` traces ``steps`` calls of ``fn`` (which must
block) and ``summarize(trace_dir, compiled_text, steps)`` reads the trace back. Every timed event
of the program's module is matched, through its ``hlo_op`` argument, to an instruction of the
*compiled* HLO (``compiled.as_text()``), which says what the op is:

* ``category``: ``convolution`` | ``attention kernel`` (cuDNN/Pallas fused attention custom
  calls) | ``dot`` | ``collective`` | ``gather/scatter`` | ``reduce`` (norm statistics,
  softmax sums, pooling) | ``copy/transpose`` | ``elementwise`` | ``other``, decided from the
  instruction and, for a fusion, from what its fused computation contains (a fusion with a
  convolution is a convolution, then attention, dot, ...);
* ``source``: the model code it came from, from the instruction's ``op_name`` metadata, folded to
  block kind, sub-module and primitive (``C block/se/reduce_sum``, ``T block/attention/dot``),
  prefixed ``bwd:`` for the backward pass of a training step.

The summary has milliseconds per call by category and by source (top entries), the top single
ops, the busy time (union of op intervals, so concurrent ops count once) and the wall time, so
``idle = wall - busy`` shows time the device waited (launch gaps, host synchronisation). On CPU
the events come from XLA's thunk executor on the ``/host:CPU`` process; where device processes
(``/device:GPU:0``, ``/device:TPU:0``) are present only their events count, so host-side launch
events are not counted twice. Events without an ``hlo_op`` fall back to a category from the
kernel name (``gemm``, ``conv``, ``nccl``, ...). Nothing here imports the models: the caller
passes a callable and the compiled program's text.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Callable

import jax

CATEGORIES = ("convolution", "attention kernel", "dot", "collective", "gather/scatter", "reduce",
              "copy/transpose", "elementwise", "other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                "collective-broadcast")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BLOCK = re.compile(r"^(?:stage\d+_block\d+|(?:down|up)\d+_block\d+|mid_block\d+)_([CT])$")
_KERNEL_NAME_RULES = (  # category of a device kernel with no hlo_op, from its name.
    (re.compile(r"fmha|flash|attention", re.I), "attention kernel"),
    (re.compile(r"conv|cudnn|implicit_gemm|wgrad|dgrad", re.I), "convolution"),
    (re.compile(r"gemm|matmul|xmma|cutlass|dot", re.I), "dot"),
    (re.compile(r"nccl|all_reduce|allreduce|all-reduce", re.I), "collective"),
    (re.compile(r"transpose|copy|memcpy", re.I), "copy/transpose"),
    (re.compile(r"reduce", re.I), "reduce"),
)


def _split_type(rest: str) -> tuple[str, str]:
  """``(result type, 'opcode(...)...')`` of the text after ``name = ``; tuple types nest."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def parse_hlo(text: str) -> tuple[dict, dict, str]:
  """``(instructions, computations, module name)`` of HLO text: ``instructions`` maps a name to
  ``(opcode, called computations, custom-call target, op_name)``, ``computations`` a
  computation's name to the names of its instructions."""
  instructions: dict[str, tuple] = {}
  computations: dict[str, list[str]] = collections.defaultdict(list)
  module = ""
  current = None
  for line in text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
      continue
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("(")[0]:
      current = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, rest = m.groups()
    _, call = _split_type(rest)
    opcode = call.split("(", 1)[0].strip()
    target = _TARGET.search(call)
    op_name = _OP_NAME.search(call)
    instructions[name] = (opcode, tuple(_CALLS.findall(call)),
                          target.group(1) if target else "",
                          op_name.group(1) if op_name else "")
    computations[current].append(name)
  return instructions, dict(computations), module


def _opcodes_inside(name: str, instructions: dict, computations: dict, seen=None) -> set[str]:
  """Opcodes (and custom-call targets, as ``custom-call:TARGET``) of an instruction and of every
  computation it calls, recursively."""
  seen = set() if seen is None else seen
  opcode, calls, target, _ = instructions[name]
  out = {opcode}
  if target:
    out.add("custom-call:" + target)
  for comp in calls:
    if comp in seen:
      continue
    seen.add(comp)
    for inner in computations.get(comp, ()):
      out |= _opcodes_inside(inner, instructions, computations, seen)
  return out


def _heavy_op_name(name: str, instructions: dict, computations: dict) -> str:
  """The ``op_name`` of the first convolution or dot an instruction is or contains (a fusion's
  own metadata often names its root, e.g. the add after a convolution), else its own."""
  opcode, calls, _, op_name = instructions[name]
  if opcode in ("convolution", "dot"):
    return op_name
  for comp in calls:
    for inner in computations.get(comp, ()):
      found = _heavy_op_name(inner, instructions, computations)
      if found and instructions[inner][0] in ("convolution", "dot", "fusion"):
        inner_opcode = instructions[inner][0]
        if inner_opcode != "fusion" or found != instructions[inner][3]:
          return found
  return op_name


def _category_of_opcodes(ops: set[str]) -> str:
  targets = " ".join(o for o in ops if o.startswith("custom-call:")).lower()
  if "convolution" in ops or "conv" in targets:
    return "convolution"
  if any(k in targets for k in ("fmha", "flash", "attention", "tpu_custom_call", "mosaic")):
    return "attention kernel"
  if "dot" in ops or any(k in targets for k in ("gemm", "matmul", "cublas")):
    return "dot"
  if any(o.startswith(c) for o in ops for c in _COLLECTIVES):
    return "collective"
  if ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
    return "gather/scatter"
  if ops & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduce"
  plain = ops - {"parameter", "bitcast", "reshape", "constant", "tuple", "get-tuple-element"}
  if plain and plain <= {"copy", "transpose", "broadcast", "slice", "concatenate", "pad",
                         "fusion"} and plain & {"copy", "transpose", "concatenate", "pad"}:
    return "copy/transpose"
  if plain and plain <= {"fusion", "add", "subtract", "multiply", "divide", "maximum", "minimum",
                         "exponential", "log", "tanh", "logistic", "erf", "rsqrt", "sqrt",
                         "negate", "select", "compare", "convert", "broadcast", "abs", "power",
                         "and", "or", "not", "clamp", "iota", "slice", "copy", "transpose",
                         "concatenate", "pad", "exponential-minus-one", "log-plus-one", "sign",
                         "floor", "ceil", "round-nearest-even", "round-nearest-afz", "cosine",
                         "sine", "xor", "shift-left", "shift-right-logical", "remainder",
                         "reverse", "is-finite", "rng-bit-generator"}:
    return "elementwise"
  return "other"


def source_group(op_name: str) -> str:
  """``op_name`` metadata folded to ``[bwd: ]<block kind or module>/<sub-module>/<primitive>``."""
  if not op_name:
    return "(no source)"
  backward = "transpose(" in op_name
  parts = [p for p in op_name.split("/") if p and not p.startswith("jit(")]
  parts = [re.sub(r"^(?:\w+\()+([^()]*)\)*$", r"\1", p) for p in parts]  # jvp(AsCAN) -> AsCAN
  primitive = parts[-1] if parts else op_name
  modules = parts[:-1]
  group = None
  for i, p in enumerate(modules):
    m = _BLOCK.match(p)
    if m:
      sub = modules[i + 1] if i + 1 < len(modules) else ""
      group = f"{m.group(1)} block" + (f"/{sub}" if sub else "")
      break
  if group is None:
    group = "/".join(modules[1:3] if len(modules) > 1 else modules) or "(top level)"
  return ("bwd: " if backward else "") + f"{group}/{primitive}"


def classify_program(compiled_text: str) -> tuple[dict[str, tuple[str, str]], str]:
  """``({top-level instruction name: (category, source)}, module name)`` of a compiled
  program (instructions of the entry computation and of computations it calls, e.g. loops)."""
  instructions, computations, module = parse_hlo(compiled_text)
  out = {}
  for name in instructions:
    category = _category_of_opcodes(_opcodes_inside(name, instructions, computations))
    op_name = instructions[name][3]
    if category in ("convolution", "dot"):
      op_name = _heavy_op_name(name, instructions, computations) or op_name
    out[name] = (category, source_group(op_name))
  return out, module


def _load_trace(trace_dir: str) -> list[dict]:
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                        "perfetto_trace.json.gz")), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}/plugins/profile: the "
                            "trace was not written (jax.profiler.trace(create_perfetto_trace=True))")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_events(events: list[dict], module: str) -> list[tuple[str, float, float]]:
  """``(hlo_op or kernel name, start us, duration us)`` of the program's timed ops: device
  processes' events when there are any, else the host's XLA thunk events (see module doc)."""
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items() if n.startswith("/device:")}
  out = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    args = e.get("args", {})
    op = args.get("hlo_op")
    if device_pids:
      if e.get("pid") not in device_pids:
        continue
      if args.get("hlo_module") and module and not args["hlo_module"].startswith(module):
        continue
      out.append((op or e.get("name", ""), float(e["ts"]), float(e["dur"])))
    elif op and e.get("name") == op and (not module or args.get("hlo_module") == module):
      out.append((op, float(e["ts"]), float(e["dur"])))
  return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def _fallback_category(kernel: str) -> str:
  for pattern, category in _KERNEL_NAME_RULES:
    if pattern.search(kernel):
      return category
  return "other"


def summarize(trace_dir: str, compiled_text: str, steps: int, wall_seconds: float | None = None,
              top: int = 12) -> dict:
  """Milliseconds per call of the traced program by category, source and op (module doc)."""
  table, module = classify_program(compiled_text)
  events = op_events(_load_trace(trace_dir), module)
  if not events:
    raise ValueError(f"the trace under {trace_dir} has no timed op of module {module!r}")
  by_category = collections.Counter()
  by_source = collections.Counter()
  by_op = collections.Counter()
  unmatched = 0.0
  for op, _, dur in events:
    category, source = table.get(op, (None, None))
    if category is None:
      category, source = _fallback_category(op), f"(kernel) {op[:60]}"
      unmatched += dur
    by_category[category] += dur
    by_source[source] += dur
    by_op[(op, category, source)] += dur
  op_total = sum(by_category.values())
  busy = _union_length([(s, s + d) for _, s, d in events])
  ms = lambda us: us / 1e3 / steps
  out = {
      "module": module, "steps": steps, "events": len(events),
      "op_ms_per_step": ms(op_total), "busy_ms_per_step": ms(busy),
      "by_category_ms": {c: ms(by_category[c]) for c in CATEGORIES if by_category[c]},
      "by_category_share": {c: by_category[c] / op_total for c in CATEGORIES if by_category[c]},
      "top_sources": [{"source": s, "ms": ms(t), "share": t / op_total}
                      for s, t in by_source.most_common(top)],
      "top_ops": [{"op": o, "category": c, "source": s, "ms": ms(t), "share": t / op_total}
                  for (o, c, s), t in by_op.most_common(top)],
      "unmatched_share": unmatched / op_total,
  }
  if wall_seconds is not None:
    out["wall_ms_per_step"] = 1e3 * wall_seconds / steps
    out["idle_ms_per_step"] = max(0.0, out["wall_ms_per_step"] - out["busy_ms_per_step"])
  return out


def profile_call(fn: Callable[[], object], compiled_text: str, steps: int, trace_dir: str) -> dict:
  """Traces ``steps`` calls of ``fn`` (already compiled and warm; each call must block) into
  ``trace_dir`` and returns ``summarize``'s dict."""
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    wall = time.perf_counter() - t0
  return summarize(trace_dir, compiled_text, steps, wall)
