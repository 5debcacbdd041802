"""Memory of the Pallas attention path before and after the no-dense-bias change.

Run from the repository root: ``.venv/bin/python results/attention_memory/measure.py``
(about a minute on a 2-core CPU; nothing is executed, only compiled).

Two measures per case, for the forward and for forward + backward (gradients of q, k, v and of
the bias parameters):

* ``cpu_*``: ``jax.jit(f).lower(...).compile().memory_analysis()`` on CPU with the kernel in
  Pallas' TPU interpret mode. The interpreter keeps the kernel's own memory outside XLA, so these
  bytes are what the *wrapper* materialises around the kernel (padding, bias broadcasts, kernel
  operands and residuals) plus the arguments and outputs.
* ``tpu_largest``: the largest arrays in the StableHLO lowered *for TPU* (``lowering_platforms=
  ("tpu",)``, not compiled: there is no TPU here), i.e. the operands and results around the Mosaic
  custom calls exactly as a TPU run would allocate them.

"before" is ``ascan_jax/models/attention.py`` at commit ``BEFORE_COMMIT`` (read with git show),
"after" the working tree. Writes ``memory.json`` next to this file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.experimental.pallas.tpu as pltpu  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ascan_jax.models import attention as after  # noqa: E402
from ascan_jax.models import separable_bias  # noqa: E402

BEFORE_COMMIT = "490da7d"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.json")


def load_before():
  source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:ascan_jax/models/attention.py"],
                          cwd=REPO, check=True, capture_output=True, text=True).stdout
  path = "/tmp/attention_before_%s.py" % BEFORE_COMMIT
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("attention_before", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax modules (dataclasses) look themselves up here.
  spec.loader.exec_module(module)
  return module


def largest_tpu_arrays(fn, args, top=4):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  sizes = {"f32": 4, "bf16": 2, "i32": 4, "f16": 2}
  found = set(re.findall(r"tensor<((?:\d+x)+)(f32|bf16|i32|f16)>", text))
  arrays = sorted(((int(np.prod([int(d) for d in dims.strip("x").split("x")])) * sizes[t],
                    dims.strip("x") + " " + t) for dims, t in found), reverse=True)
  return [{"shape": s, "bytes": b} for b, s in arrays[:top]]


def cpu_bytes(fn, args):
  with pltpu.force_tpu_interpret_mode():
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
          "outputs": m.output_size_in_bytes,
          "total": m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes}


def forward_and_backward(attend, n_args):
  """(forward, forward + backward) of ``attend(*args)``; the backward differentiates all args."""
  def loss(*args):
    return attend(*args).astype(jnp.float32).sum()
  return attend, jax.grad(loss, argnums=tuple(range(n_args)))


def measure(name, attend, args):
  fwd, bwd = forward_and_backward(attend, len(args))
  row = {"case": name}
  for tag, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
    t = time.time()
    row[f"cpu_{tag}"] = cpu_bytes(fn, args)
    row[f"tpu_largest_{tag}"] = largest_tpu_arrays(fn, args)
    row[f"seconds_{tag}"] = round(time.time() - t, 1)
  print(json.dumps(row), flush=True)
  return row


def main():
  before = load_before()
  rows = []
  # T2I UNet level 1 at 1024²: 128x128 latent tokens, 5 heads of 64, RoPE (no bias), bf16.
  b, n, h, d = 1, 128 * 128, 5, 64
  qkv = [jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)] * 3
  scale = d ** -0.5
  rows.append(measure("t2i_16384_no_bias/before",
                      lambda q, k, v: before._pallas_attention(q, k, v, None, scale), qkv))
  rows.append(measure("t2i_16384_no_bias/after",
                      lambda q, k, v: after.dot_product_attention(
                          q, k, v, None, implementation="pallas"), qkv))

  # Segmentation backbone at 512²: AsCAN-T stage 2, 64x64 tokens, 4 heads of 32, rel-pos bias.
  g, h, d = 64, 4, 32
  n = g * g
  qkv = [jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)] * 3
  table = jax.ShapeDtypeStruct((h, 2 * g - 1, 2 * g - 1), jnp.float32)
  offsets = jax.ShapeDtypeStruct((h, 2 * g - 1), jnp.float32)
  idx = before.relative_position_index(g, g)
  scale = d ** -0.5

  def gathered(table):
    return table[:, idx[..., 0], idx[..., 1]][None]

  rows.append(measure("seg_4096_rel_bias_full_table/before",
                      lambda q, k, v, t: before._pallas_attention(q, k, v, gathered(t), scale),
                      qkv + [table]))
  rows.append(measure("seg_4096_rel_bias_full_table/after",
                      lambda q, k, v, t: after.dot_product_attention(
                          q, k, v, gathered(t), implementation="pallas"), qkv + [table]))
  rows.append(measure("seg_4096_rel_bias_separable/after",
                      lambda q, k, v, r, c: after.dot_product_attention(
                          q, k, v, separable_bias.SeparableBias(r, c, g, g),
                          implementation="pallas"), qkv + [offsets, offsets]))
  rows.append(measure("seg_4096_rel_bias_full_table/xla_reference",
                      lambda q, k, v, t: after.dot_product_attention(
                          q, k, v, gathered(t), implementation="xla"), qkv + [table]))
  info = {"jax": jax.__version__, "platform": platform.platform(),
          "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "command": ".venv/bin/python results/attention_memory/measure.py",
          "before_commit": BEFORE_COMMIT}
  with open(OUT, "w") as f:
    json.dump({"info": info, "rows": rows}, f, indent=1)
  print("wrote", OUT)


if __name__ == "__main__":
  main()
