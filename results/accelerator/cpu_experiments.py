"""Candidate changes to AsCAN-T measured against the current model on this CPU (NOTES.md).

``JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python results/accelerator/cpu_experiments.py
[--batch=4] [--rounds=7] [--train]``

Every variant is built in this process only (model classes are swapped in ``blocks`` before the
model is built; nothing in the package changes), runs on the same variables as the baseline,
and is checked for equal outputs (max |difference| relative to max |baseline|). Timings are
interleaved: in each round every variant's call is timed once (at least ``--min_seconds``), so
a change in the machine's load hits every variant alike; the medians over rounds are compared.
The shared 2-core machine was heavily loaded while this ran: only the ratios mean something.

Variants (inference, 224x224, float32, the classification task's model with exact GELU):
* ``baseline``: the model as it is.
* ``tanh_gelu``: GELU's tanh approximation (what runs before ``model.gelu`` existed used).
* ``se_folded``: squeeze-excite's gate multiplied into the 1x1 projection kernel per example,
  ``(x * g) W = x (diag(g) W)``: the gated 4x-wide activation is never written.
* ``bn_folded``: inference BatchNorm of the expansion and projection convolutions folded into
  their kernels (``W * gamma / sqrt(var + eps)``, bias ``beta - mean * gamma / sqrt(var + eps)``).
With ``--train``: the training step (``train.builder``) with ``remat_policy`` none and dots.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import ascan
from ascan_jax.models import blocks
from ascan_jax.models import variants
from ascan_jax.perf import synthetic


class GateOnly(blocks.SqueezeExcite):
  """SqueezeExcite's parameters and arithmetic, returning the gate ``[B, 1, 1, C]`` only."""

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    s = blocks.conv(self.reduced_features, 1, dtype=self.dtype, name="reduce", use_bias=True,
                    axes=("mlp", "embed"))(s)
    s = blocks.gelu(s, self.gelu)
    s = blocks.conv(x.shape[-1], 1, dtype=self.dtype, name="expand", use_bias=True,
                    axes=("embed", "mlp"))(s)
    return nn.sigmoid(s)


class Kernel1x1(nn.Module):
  """The ``project_conv`` kernel as a parameter (same name and shape as ``nn.Conv``'s)."""
  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("kernel", nn.initializers.zeros, self.shape)


class SEFoldedConvBlock(blocks.ConvBlock):
  """``ConvBlock`` (batch norm, no embedding) with the SE gate folded into the projection."""

  @nn.compact
  def __call__(self, x, train, emb=None):
    in_features = x.shape[-1]
    mid = in_features * self.expand_ratio
    y = blocks.conv(mid, 3, self.stride, dtype=self.dtype, name="expand_conv",
                    axes=("embed", "mlp"))(x)
    y = self._norm(train, "expand", ("mlp",))(y)
    y = blocks.gelu(y, self.gelu)
    gate = GateOnly(max(1, int(in_features * self.se_ratio)), self.dtype, self.gelu, name="se")(y)
    kernel = Kernel1x1((1, 1, mid, self.features), name="project_conv")()[0, 0]
    per_example = gate[:, 0, 0, :, None] * kernel.astype(self.dtype)  # [B, mid, out]
    y = jnp.einsum("bhwc,bcd->bhwd", y, per_example)
    y = self._norm(train, "project", ("embed",))(y)
    shortcut = x
    if self.stride > 1:
      shortcut = nn.avg_pool(shortcut, (self.stride, self.stride), (self.stride, self.stride),
                             padding="SAME")
    if in_features != self.features:
      shortcut = blocks.conv(self.features, 1, dtype=self.dtype, name="shortcut_conv",
                             use_bias=True)(shortcut)
    y = blocks.DropPath(self.drop_path, name="drop_path")(y, deterministic=not train)
    return shortcut + y


def fold_batch_norm(variables):
  """Inference variables with every ``<x>_conv`` followed by ``<x>_bn`` folded (the BN becomes
  scale 1, bias 0, mean 0, var 1 - eps, i.e. the identity up to rounding)."""
  params = jax.tree.map(lambda a: a, dict(variables["params"]))
  stats = jax.tree.map(lambda a: a, dict(variables["batch_stats"]))

  def walk(p, s):
    for name in list(p):
      if name.endswith("_bn") and name[:-3] + "_conv" in p and isinstance(p[name], dict):
        conv = dict(p[name[:-3] + "_conv"])
        bn, st = dict(p[name]), dict(s[name])
        inv = bn["scale"] / jnp.sqrt(st["var"] + 1e-5)
        conv["kernel"] = conv["kernel"] * inv
        p[name[:-3] + "_conv"] = conv
        p[name] = {"scale": jnp.ones_like(bn["scale"]), "bias": bn["bias"] - st["mean"] * inv}
        s[name] = {"mean": jnp.zeros_like(st["mean"]), "var": jnp.ones_like(st["var"]) - 1e-5}
      elif isinstance(p[name], dict) and name in s:
        p[name], s[name] = dict(p[name]), dict(s[name])
        walk(p[name], s[name])

  walk(params, stats)
  return {"params": params, "batch_stats": stats}


def build(variant: str):
  kw = dict(variants.VARIANTS["T"])
  kw.pop("drop_path_rate")
  gelu = "tanh" if variant == "tanh_gelu" else "exact"
  original = blocks.ConvBlock
  if variant == "se_folded":
    blocks.ConvBlock = SEFoldedConvBlock
  try:
    model = ascan.AsCAN(num_classes=1000, attention_impl="xla", gelu=gelu, **kw)
    # Bind the class now: ascan.py looks blocks.ConvBlock up when the model is applied.
    return model, (SEFoldedConvBlock if variant == "se_folded" else original)
  finally:
    blocks.ConvBlock = original


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--min_seconds", type=float, default=1.0)
  p.add_argument("--variants", default="baseline,tanh_gelu,se_folded,bn_folded")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  names = a.variants.split(",")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((a.batch, 224, 224, 3), np.float32))
  base_model, _ = build("baseline")
  abstract = jax.eval_shape(lambda k: nn.unbox(base_model.init(k, x[:1])), jax.random.key(0))
  variables = synthetic.filled_like(abstract)
  # Running statistics that are not the identity, so folding them is a real change.
  variables["batch_stats"] = jax.tree.map(lambda v: v * 0.5 + 0.25, variables["batch_stats"])
  calls, outputs = {}, {}
  for name in names:
    model, conv_cls = build(name)
    v = fold_batch_norm(variables) if name == "bn_folded" else variables
    original = blocks.ConvBlock
    blocks.ConvBlock = conv_cls
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False)).lower(v, x).compile()
      print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
      blocks.ConvBlock = original
    calls[name] = (lambda c=compiled, v=v: jax.block_until_ready(c(v, x)))
    outputs[name] = np.asarray(calls[name]())
  ref = outputs["baseline"]
  times = {n: [] for n in names}
  for r in range(a.rounds):
    for n in names:
      k, t0 = 0, time.perf_counter()
      while True:
        calls[n]()
        k += 1
        if time.perf_counter() - t0 >= a.min_seconds:
          break
      times[n].append((time.perf_counter() - t0) / k)
    print(f"round {r}: " + ", ".join(f"{n} {a.batch / times[n][-1]:.2f}" for n in names),
          flush=True)
  result = {"batch": a.batch, "rounds": a.rounds, "variants": {}}
  base = float(np.median(times["baseline"]))
  for n in names:
    med = float(np.median(times[n]))
    paired = np.median(np.asarray(times["baseline"]) / np.asarray(times[n]))
    diff = float(np.max(np.abs(outputs[n] - ref)) / np.max(np.abs(ref)))
    result["variants"][n] = {"img_per_s": a.batch / med, "speedup_vs_baseline": base / med,
                             "paired_speedup_median": float(paired),
                             "max_rel_output_difference": diff}
    print(f"{n:10s} {a.batch / med:8.2f} img/s  x{base / med:.3f} (paired x{paired:.3f})  "
          f"max rel diff {diff:.2e}", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
