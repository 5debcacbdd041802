"""``--mode=summary``: parameters, MACs and activation memory, without allocating the model.

* parameters: from ``jax.eval_shape`` of the initialiser (no memory is touched);
* MACs per example: counted from the compiled XLA program of one forward pass at batch 1
  (``hlo_macs``: every convolution and dot, attention included), with the ``xla`` attention
  implementation so the count does not depend on the kernel; XLA's own flop estimate is reported
  beside it;
* memory at ``summary.memory_batch_size`` (64, the paper's Table 8 setting): XLA's buffer
  assignment of the compiled inference forward and of the training loss+gradient, in the
  config's compute dtype (temporaries, i.e. activations and workspace, excluding parameters).
  0 skips it: compiling the training step of a large model at a large input can take more host
  memory than the MAC count needs (UperNet-AsCAN-B at 512x2048: over 11 GB on a CPU).
Writes ``DIR/summary.json`` and prints a table.
"""
from __future__ import annotations

import collections
import json
import time

import jax
import jax.numpy as jnp

from ascan_jax import fileio
from ascan_jax.perf import hlo_macs


def abstract_variables(task, model):
  return jax.eval_shape(lambda k: task.init_variables(k, model), jax.random.key(0))


def params_by_prefix(params) -> dict[str, int]:
  """Parameter counts grouped by top-level module: stem, stage1..N, head."""
  out: dict[str, int] = collections.OrderedDict()
  for name, sub in params.items():
    group = name.split("_")[0]
    if group in ("classifier",):
      group = "head"
    size = sum(int(x.size) for x in jax.tree.leaves(sub))
    out[group] = out.get(group, 0) + size
  return dict(out)


def count_forward_macs(task, model, variables) -> dict:
  """MACs and XLA flops of one example's forward pass, from the compiled program."""
  spec = task.input_spec(1, train=False)
  compiled = jax.jit(lambda v, b: task.forward(v, b, model)).lower(variables, spec).compile()
  macs = hlo_macs.count_macs(compiled.as_text())
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"macs": macs["total"], "conv_macs": macs["conv"], "dot_macs": macs["dot"],
          "xla_flops": float(cost.get("flops", 0.0))}


def memory_bytes(task, model, variables, batch_size: int) -> dict:
  spec = task.input_spec(batch_size, train=False)
  infer = jax.jit(lambda v, b: task.forward(v, b, model)).lower(variables, spec).compile()
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}

  def loss(p, ms, b):
    return task.loss_fn(p, ms, b, jax.random.key(0))[0]

  train = jax.jit(jax.grad(loss)).lower(params, model_state,
                                        task.input_spec(batch_size, train=True)).compile()
  return {"inference_temp_bytes": int(infer.memory_analysis().temp_size_in_bytes),
          "train_temp_bytes": int(train.memory_analysis().temp_size_in_bytes)}


def summarize(task, config) -> dict:
  t0 = time.perf_counter()
  model = task.build_model(attention_impl="xla")
  variables = abstract_variables(task, model)
  params = variables["params"]
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  out = {"task": config.task, "params": n_params, "params_by_group": params_by_prefix(params)}
  m = config.get("model")
  if m is not None and "layout" in m:
    from ascan_jax.models import layout as layout_lib
    stages = layout_lib.parse_layout(m.layout)
    out.update(layout=m.layout, widths=list(m.widths), stem_width=m.stem_width,
               depths=[len(s) for s in stages],
               blocks=[{"C": s.count("C"), "T": s.count("T")} for s in stages],
               heads=[w // m.head_dim if "T" in s else 0 for s, w in zip(stages, m.widths)],
               head_dim=m.head_dim, embed_dim=m.get("embed_dim"))  # None: features only.
  if "data" in config and "image_size" in config.data:
    out["image_size"] = config.data.image_size
  out["input_shapes"] = {k: list(v.shape[1:]) for k, v in task.input_spec(1).items()
                         if len(v.shape) > 1}
  out.update(count_forward_macs(task, model, variables))
  out["gmacs"] = out["macs"] / 1e9
  mem_batch = config.summary.memory_batch_size
  out["memory_batch_size"] = mem_batch
  out["compute_dtype"] = jnp.dtype(task.dtype).name
  if mem_batch > 0:
    out.update(memory_bytes(task, model, variables, mem_batch))
  out["seconds"] = time.perf_counter() - t0
  return out


def format_table(s: dict) -> str:
  rows = [("parameters", f"{s['params'] / 1e6:.2f} M"),
          ("MACs / example", f"{s['macs'] / 1e9:.3f} G (conv {s['conv_macs'] / 1e9:.3f} G, "
                             f"dot {s['dot_macs'] / 1e9:.3f} G)"),
          ("XLA flops / example", f"{s['xla_flops'] / 1e9:.3f} G")]
  for key in ("layout", "widths", "depths", "heads", "image_size", "input_shapes"):
    if key in s:
      rows.append((key, str(s[key])))
  if "inference_temp_bytes" in s:
    rows.append((f"inference memory (batch {s['memory_batch_size']}, {s['compute_dtype']})",
                 f"{s['inference_temp_bytes'] / 2**20:.1f} MiB"))
    rows.append((f"training memory (batch {s['memory_batch_size']}, {s['compute_dtype']})",
                 f"{s['train_temp_bytes'] / 2**20:.1f} MiB"))
  for group, n in s["params_by_group"].items():
    rows.append((f"  params in {group}", f"{n / 1e6:.3f} M"))
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(task, config, workdir: str) -> dict:
  s = summarize(task, config)
  fileio.makedirs(workdir)
  fileio.write_text(fileio.join(workdir, "summary.json"), json.dumps(s, indent=2))
  print(format_table(s), flush=True)
  return s
