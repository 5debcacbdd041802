"""One accelerator report: AsCAN's models and their PyTorch peers, measured side by side.

``python -m ascan_jax.tools.accelerator_report --out=DIR [--small | --tiny] [--deadline_s=450]``

In one process, on one device (the first JAX device; the PyTorch peers on the matching torch
device), with warm-up and medians (``modes.bench.time_call``), it measures:

* AsCAN-T/B/L inference at batch 1, 16 and 64 (the paper's Table 7 setting), 224x224, random
  normalised inputs already on the device, eval mode; AsCAN-T once per attention implementation
  available here (``auto`` and each of ``xla``/``cudnn``/``pallas`` that differs from what
  ``auto`` resolves to);
* the training step of each variant, the very one the loop runs (the classification task's loss
  with mixup/cutmix, the project's AdamW, EMA, donation: ``train.builder.build``), at the
  largest of ``train_batches`` that fits (probing downwards on out-of-memory);
* the ImageNet-256 UNet (``unet_variants`` ``imagenet``): forward at batch 64 on a 32x32x4
  latent with one class token, samples/s of Heun 30 with constant guidance 1.78 (118 network
  evaluations per sample), from the forward rate and from a timed sampling run;
* the T2I UNet (``t2i``): latency of one network evaluation at batch 1 for 512x512 and
  1024x1024 images (64x64 and 128x128 latents) with 128 random 4096-wide text tokens, and the
  per-image latency of a Heun 30 + guidance sample it implies (118 evaluations; no text encoder,
  no VAE);
* UperNet-AsCAN-T at 512x512, batch 1, frames per second;
* timm's MaxViT-T, ConvNeXt-T, Swin-T and CoAtNet-0 at the same batches (``perf.torch_peers``:
  ``torch.compile`` on CUDA, bf16 autocast, channels-last), where torch and timm import;
* a ``jax.profiler`` trace of AsCAN-T's headline inference call and of its training step,
  summarised by op type and source (``perf.profile_summary``);
* on a GPU or TPU, an attention sweep (each implementation, the classifier's and the UNet's
  head dims and sequence lengths) whose fastest choices are written as
  ``DIR/attention_choices.json``, the format of ``perf/attention_choices.json``.

Compute is bf16 on accelerators and float32 on a CPU (``compute.compute_dtype('auto')``), for
both frameworks. MFU = model FLOPs (2 x MACs per image for inference, 6 x for training, MACs
counted from the program's HLO with ``xla`` attention, as ``--mode=summary``) over the device's
peak (``perf.peaks``).

Rows run in priority order (the batch-16 comparison with MaxViT-T and ConvNeXt-T first, the
AsCAN-B training step next, ...), and a row whose rough cost does not fit in what is left of
``--deadline_s`` is skipped and listed with that reason, so a cold accelerator finishes the
run in the time given. A row that fails is listed with its error; the others go on.

Presets: the default measures everything above; ``--small`` (for a CPU) AsCAN-T only at batch 1
and 4, a training step at batch 8, the UNet forward at batch 2, no T2I UNet (1.85B parameters),
peers in eager mode; ``--tiny`` (the test) shrinks every model. Writes ``DIR/report.json``,
``DIR/report.md`` and ``DIR/throughput.png`` (``perf.report``) and the traces under
``DIR/traces/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform as platform_lib
import sys
import time
import traceback
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax import compute
from ascan_jax.diffusion import guidance as guidance_lib
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.models import ascan
from ascan_jax.models import attention
from ascan_jax.models import unet as unet_lib
from ascan_jax.models import upernet
from ascan_jax.models import variants
from ascan_jax.modes import bench
from ascan_jax.perf import attention_table
from ascan_jax.perf import hlo_macs
from ascan_jax.perf import peaks
from ascan_jax.perf import profile_summary
from ascan_jax.perf import report as report_lib
from ascan_jax.perf import synthetic
from ascan_jax.perf import torch_peers

SECTIONS = ("classification", "peers", "train", "diffusion", "t2i", "segmentation", "attention")
PAPER_GUIDANCE = guidance_lib.PAPER_CONSTANT_SCALE  # 1.78, constant (the paper's Table 4).
# The --tiny preset's models: every kind of block once, as little to compile as possible.
TINY_CLASSIFIER = dict(layout="C-T", widths=(8, 16), stem_width=8, embed_dim=16, head_dim=8,
                       drop_path_rate=0.1)
TINY_UNET = dict(channels=(8, 16), down_layout="C-T", mid_layout="T", head_dim=8,
                 context_dim=8, norm_groups=4)


@dataclasses.dataclass
class Settings:
  """What the report measures; ``PRESETS`` holds the three sets, flags override fields."""
  preset: str = "full"
  image_size: int = 224
  batch_sizes: tuple[int, ...] = (1, 16, 64)
  headline_batch: int = 16  # the comparison batch (the paper's Fig. 3) and the profiled call.
  variants: tuple[str, ...] = ("T", "B", "L")
  train_batches: tuple[int, ...] = (256, 128, 64, 32, 16, 8)  # probed from the largest down.
  unet_variant: str = "imagenet"
  unet_latent: int = 32
  unet_batch: int = 64
  unet_context_tokens: int = 1
  sampler: str = "heun"
  sampler_steps: int = 30
  measure_sampling: bool = True
  t2i_variant: str = "t2i"
  t2i_latents: tuple[int, ...] = (64, 128)  # 512 and 1024 pixel images (8x VAE).
  t2i_tokens: int = 128
  unet_overrides: dict = dataclasses.field(default_factory=dict)  # AsCANUNet keyword arguments.
  upernet_size: int = 512
  upernet_channels: int = 512
  train_overrides: dict = dataclasses.field(default_factory=dict)  # "augment.mixup_alpha": 0.
  peers: tuple[str, ...] = tuple(torch_peers.PEERS)
  peer_compile: str = "auto"
  warmup: int = 3
  repeats: int = 5
  min_seconds: float = 0.2
  profile_steps: int = 3
  deadline_s: float = 450.0  # 0: no deadline.
  sections: tuple[str, ...] = SECTIONS
  skip_reasons: dict = dataclasses.field(default_factory=dict)  # section -> why it is skipped.


PRESETS = {
    "full": Settings(),
    "small": Settings(
        preset="small", batch_sizes=(1, 4), headline_batch=4, variants=("T",),
        train_batches=(8,), unet_batch=2, measure_sampling=False, warmup=1, repeats=3,
        min_seconds=0.5, profile_steps=2, deadline_s=0.0,
        skip_reasons={"t2i": "--small: the T2I UNet has 1.85B parameters (7.4 GB in float32) and "
                             "0.65 / 2.6 TMACs per call at 512 / 1024 px, too much for a small "
                             "CPU; run it on an accelerator"}),
    "tiny": Settings(
        preset="tiny", image_size=32, batch_sizes=(2,), headline_batch=2, variants=("tiny",),
        train_batches=(4,), unet_variant="tiny", unet_latent=8, unet_batch=2, sampler_steps=2,
        t2i_variant="tiny", t2i_latents=(8,), t2i_tokens=4, unet_overrides=TINY_UNET,
        upernet_size=32, upernet_channels=16, peers=("ConvNeXt-T",), warmup=1, repeats=2,
        min_seconds=0.0, profile_steps=1, deadline_s=0.0,
        train_overrides={"augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0}),
}
# Rough seconds a row needs on a cold accelerator (compilation dominates); a row is skipped
# when less than this is left before the deadline. Checked against the wall times in a report.
COST_S = {"infer": 15, "train": 60, "peer": 45, "unet": 40, "sampling": 40, "t2i": 60,
          "segmentation": 25, "attention": 60}


@functools.lru_cache(maxsize=None)
def _peak(device, dtype: str) -> tuple[float, str]:
  return peaks.peak_flops(device, dtype)  # measured on a CPU: once per process.


def variant_name(key: str) -> str:
  return f"AsCAN-{key}"


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return any(k in text for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemory"))


def largest_fitting(candidates, attempt: Callable[[int], dict]) -> tuple[int, dict, list[dict]]:
  """``attempt(b)`` for ``b`` in ``candidates`` from the largest down until one does not run out
  of memory: ``(batch, its result, [{batch, error} of those that did]``). Other errors raise."""
  tried = []
  for b in sorted(set(int(c) for c in candidates), reverse=True):
    try:
      return b, attempt(b), tried
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      tried.append({"batch": b, "error": str(e).splitlines()[0][:300]})
      gc.collect()
  raise RuntimeError(f"no batch of {sorted(candidates, reverse=True)} fits in device memory: "
                     + "; ".join(f"{t['batch']}: {t['error']}" for t in tried))


class Report:
  """Collects rows and runs them in priority order against the deadline."""

  def __init__(self, settings: Settings, out_dir: str, argv: list[str] | None = None):
    self.s = settings
    self.argv = list(argv or [])
    self.out_dir = out_dir
    self.device = jax.devices()[0]
    self.platform = self.device.platform
    self.dtype = compute.compute_dtype("auto")
    self.low_precision = jnp.dtype(self.dtype) != jnp.dtype(jnp.float32)
    self.start = time.perf_counter()
    self.rows: list[dict] = []
    self.profiles: dict[str, dict] = {}
    self.attention_sweep: list[dict] = []
    self.attention_choices: list[dict] = []
    self.peer_models: dict[str, Any] = {}
    self._macs: dict[str, float] = {}
    self._unet_params: dict[Any, Any] = {}
    self.peak, self.peak_source = _peak(self.device, jnp.dtype(self.dtype).name)

  # ---- bookkeeping ---------------------------------------------------------------------------
  def left(self) -> float:
    if self.s.deadline_s <= 0:
      return float("inf")
    return self.s.deadline_s - (time.perf_counter() - self.start)

  def run_jobs(self, jobs: list[tuple[float, str, str, Callable[[], list[dict]], dict]]):
    """``jobs``: ``(priority, cost kind, title, fn, row template)``; ``fn`` returns rows."""
    for _, kind, title, fn, template in sorted(jobs, key=lambda j: j[0]):
      if self.left() < COST_S[kind]:
        self.rows.append({**template, "status": "skipped",
                          "reason": f"deadline: {max(0.0, self.left()):.0f} s left of "
                                    f"--deadline_s={self.s.deadline_s:g}, this row needs about "
                                    f"{COST_S[kind]} s"})
        print(f"[report] skip {title}: deadline", flush=True)
        continue
      t0, cpu0 = time.perf_counter(), time.process_time()
      print(f"[report] {title} ...", flush=True)
      try:
        rows = fn()
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        rows = [{**template, "status": "failed",
                 "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}]
      wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
      for r in rows:
        r.setdefault("status", "ok")
        r.setdefault("wall_seconds", wall)
        r.setdefault("cpu_seconds", cpu)  # this process's CPU time: tells load apart on a CPU.
        self.rows.append(r)
        if r["status"] == "ok":
          print(f"[report]   {r['model']} {r.get('impl', '')} batch {r.get('batch')}: "
                f"{r['value']:.4g} {r['metric']} ({wall:.1f} s)", flush=True)
        else:
          print(f"[report]   {r['status']}: {r.get('reason')}", flush=True)

  def timed(self, call: Callable[[], Any]) -> list[float]:
    s = self.s
    return bench.time_call(call, warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)

  def stats_row(self, template: dict, times: list[float], examples: int, macs: float | None,
                flops_per_mac: float = 2.0) -> dict:
    med = float(np.median(times))
    r = {**template, "seconds_median": med, "seconds_min": min(times),
         "seconds_max": max(times), "repeats": len(times), "images_per_second": examples / med}
    if macs:
      r["gmacs_per_image"] = macs / 1e9
      r["mfu"] = flops_per_mac * macs * r["images_per_second"] / self.peak
    return r

  def profile(self, call: Callable[[], Any], compiled, name: str) -> dict:
    """``profile_summary`` of a few calls, or ``{"error": ...}``: a profiler that cannot run
    here (no CUPTI, say) costs the report its profile, not its measurements."""
    try:
      return profile_summary.profile_call(call, compiled.as_text(), self.s.profile_steps,
                                          os.path.join(self.out_dir, "traces", name))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}

  # ---- JAX helpers ---------------------------------------------------------------------------
  def put(self, tree):
    return jax.device_put(tree, self.device)

  def normal(self, shape, dtype=jnp.float32, seed: int = 1) -> jax.Array:
    """Standard normal values drawn on the host (no RNG program to compile), on the device."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return self.put(jnp.asarray(x, dtype))

  def compile(self, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0

  def count_macs(self, key: str, fn, *abstract_args, per: int = 1) -> float:
    """MACs of ``fn`` per example from its lowered (not compiled) HLO; cached by ``key``."""
    if key not in self._macs:
      text = jax.jit(fn).lower(*abstract_args).as_text(dialect="hlo")
      self._macs[key] = hlo_macs.count_macs(text)["total"] / per
    return self._macs[key]

  # ---- classification ------------------------------------------------------------------------
  def classifier_kwargs(self, key: str) -> dict:
    kw = dict(TINY_CLASSIFIER if key == "tiny" else variants.VARIANTS[key])
    kw.pop("drop_path_rate")
    return kw

  def classifier(self, key: str, impl: str) -> nn.Module:
    return ascan.AsCAN(num_classes=1000, attention_impl=impl, dtype=self.dtype, gelu="exact",
                       table_image_size=self.s.image_size, **self.classifier_kwargs(key))

  def resolved_impls(self, key: str, impl: str) -> list[str]:
    """What ``impl`` becomes in each stage with T blocks (sequence length, head dim)."""
    kw = self.classifier_kwargs(key)
    model = self.classifier(key, impl)
    out = []
    for stage, width, grid in zip(model.stages(), kw["widths"], model.stage_grids()):
      if "T" in stage:
        out.append(attention.resolve_implementation(impl, self.dtype, grid * grid,
                                                    kw["head_dim"]))
    return out

  def classifier_variables(self, model, batch_shape):
    abstract = jax.eval_shape(
        lambda k: nn.unbox(model.init(k, jnp.zeros(batch_shape, jnp.float32))),
        jax.random.key(0))
    return synthetic.filled_like(abstract, device=self.device)

  def classifier_macs(self, key: str) -> float:
    model = self.classifier(key, "xla")
    size = self.s.image_size
    spec = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda k: nn.unbox(model.init(k, jnp.zeros(spec.shape))),
                               jax.random.key(0))
    return self.count_macs(f"classifier/{key}", lambda v, x: model.apply(v, x), variables, spec)

  def infer_rows(self, key: str, impl: str, batches, profile: bool = False) -> list[dict]:
    model = self.classifier(key, impl)
    size = self.s.image_size
    variables = self.classifier_variables(model, (1, size, size, 3))
    params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
    macs = self.classifier_macs(key)
    resolved = sorted(set(self.resolved_impls(key, impl)))
    label = impl if impl != "auto" else f"auto ({'/'.join(resolved) or 'no T'})"
    rows = []
    for b in batches:
      x = self.normal((b, size, size, 3))
      fwd = lambda v, x: model.apply(v, x, train=False)
      compiled, compile_s = self.compile(fwd, variables, x)
      call = lambda: jax.block_until_ready(compiled(variables, x))
      template = dict(section="classification", model=variant_name(key), framework="jax",
                      impl=label, batch=b, metric="img/s", params=params,
                      compile_seconds=compile_s)
      r = self.stats_row(template, self.timed(call), b, macs)
      r["value"] = r["images_per_second"]
      rows.append(r)
      if profile and b == self.s.headline_batch:
        self.profiles[f"{variant_name(key)} inference, batch {b}, {label}"] = self.profile(
            call, compiled, f"infer_{key}")
      del compiled, x
    return rows

  # ---- training ------------------------------------------------------------------------------
  def train_config(self, key: str, batch: int):
    from ascan_jax import tasks  # pylint: disable=g-import-not-at-top
    cls = tasks.task_class("classification")
    cfg = cls.default_config()
    kw = dict(TINY_CLASSIFIER if key == "tiny" else variants.VARIANTS[key])
    for k, v in kw.items():
      cfg.model[k] = v
    cfg.model.table_image_size = self.s.image_size
    cfg.data.image_size = self.s.image_size
    cfg.data.num_classes = 1000
    cfg.batch_size = batch
    cfg.total_steps = 1000
    cfg.augment.mix_group_size = int(np.gcd(16, batch))
    for dotted, value in self.s.train_overrides.items():
      *parents, leaf = dotted.split(".")
      node = cfg
      for p in parents:
        node = node[p]
      node[leaf] = value
    tasks.validate(cfg, num_devices=1, mode="bench")
    return cls, cfg

  def train_attempt(self, key: str, batch: int, profile: bool) -> dict:
    from ascan_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    from ascan_jax.train import builder  # pylint: disable=g-import-not-at-top
    cls, cfg = self.train_config(key, batch)
    task = cls(cfg)
    setup = builder.build(task, cfg, mesh=mesh_lib.make_mesh(cfg, devices=[self.device]))
    holder = {"state": synthetic.filled_like(setup.abstract_state, setup.state_shardings)}
    data = jax.device_put(synthetic.host_batch(task.input_spec(batch), cfg.data.num_classes),
                          setup.batch_shardings)
    try:
      t0 = time.perf_counter()
      compiled = setup.train_step.lower(holder["state"], setup.frozen, data).compile()
      compile_s = time.perf_counter() - t0

      def one():
        holder["state"], metrics = compiled(holder["state"], setup.frozen, data)
        jax.block_until_ready(metrics)

      one()  # the first step allocates everything: out of memory shows here, not in the timings.
      times = self.timed(one)
      out = {"times": times, "compile_seconds": compile_s,
             "params": sum(int(x.size) for x in jax.tree.leaves(holder["state"].params))}
      if profile:
        out["profile"] = self.profile(one, compiled, f"train_{key}")
      return out
    finally:
      holder.clear()
      del data, setup

  def train_rows(self, key: str, profile: bool = False) -> list[dict]:
    batch, res, tried = largest_fitting(self.s.train_batches,
                                        lambda b: self.train_attempt(key, b, profile))
    template = dict(section="train", model=variant_name(key), framework="jax",
                    impl="train step", batch=batch, metric="img/s", params=res["params"],
                    compile_seconds=res["compile_seconds"], oom_batches=tried,
                    note=f"largest of {list(self.s.train_batches)} that fits")
    r = self.stats_row(template, res["times"], batch, self.classifier_macs(key),
                       flops_per_mac=6.0)
    r["value"] = r["images_per_second"]
    if "profile" in res:
      self.profiles[f"{variant_name(key)} training step, batch {batch}"] = res["profile"]
    return [r]

  # ---- peers ---------------------------------------------------------------------------------
  def peer(self, name: str):
    if name not in self.peer_models:
      self.peer_models[name] = torch_peers.PeerModel(
          name, platform=self.platform, low_precision=self.low_precision,
          image_size=self.s.image_size, compile_mode=self.s.peer_compile)
      self.peer_models[name].macs = self.peer_models[name].macs_per_image()
    return self.peer_models[name]

  def peer_rows(self, name: str, batches) -> list[dict]:
    pm = self.peer(name)
    rows = []
    for b in batches:
      s = self.s
      res = pm.measure(b, bench.time_call, warmup=s.warmup, repeats=s.repeats,
                       min_seconds=s.min_seconds)
      impl = "torch.compile" if res["compiled"] else "eager"
      template = dict(section="classification", model=name, framework="pytorch", impl=impl,
                      batch=b, metric="img/s", params=pm.params,
                      compile_seconds=res["compile_seconds"], timm_arch=pm.arch)
      if res.get("compile_error"):
        template["note"] = f"not compiled: {res['compile_error']}"
      r = self.stats_row(template, res["times"], b, pm.macs)
      r["value"] = r["images_per_second"]
      rows.append(r)
    return rows

  # ---- diffusion -----------------------------------------------------------------------------
  def unet(self, variant: str):
    return unet_lib.from_variant(variant, dtype=self.dtype, attention_impl="auto",
                                 **self.s.unet_overrides)

  def unet_inputs(self, model, batch: int, latent: int, tokens: int, key: int = 1):
    x = self.normal((batch, latent, latent, model.in_channels), seed=key)
    t = self.put(np.full((batch,), 500.0, np.float32))
    ctx = self.normal((batch, tokens, model.context_dim), seed=key + 1)
    return x, t, ctx

  def unet_params(self, model, latent: int, tokens: int):
    """The UNet's parameters; kept per model (the T2I UNet's 7.4 GB serve both resolutions)."""
    key = (repr(model), tokens)
    if key in self._unet_params:
      return self._unet_params[key]
    x, t, ctx = self.unet_inputs(model, 1, latent, tokens)
    abstract = jax.eval_shape(lambda k: nn.unbox(model.init(k, x, t, ctx))["params"],
                              jax.random.key(0))
    self._unet_params.clear()  # one model's parameters on the device at a time.
    self._unet_params[key] = synthetic.filled_like(abstract, device=self.device)
    return self._unet_params[key]

  def unet_macs(self, key: str, model, latent: int, tokens: int) -> float:
    xla = model.clone(attention_impl="xla")
    x, t, ctx = self.unet_inputs(xla, 1, latent, tokens)
    params = jax.eval_shape(lambda k: nn.unbox(xla.init(k, x, t, ctx))["params"],
                            jax.random.key(0))
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return self.count_macs(key, lambda p, x, t, c: xla.apply({"params": p}, x, t, c), params,
                           spec(x), spec(t), spec(ctx))

  def sampling_nfe(self) -> int:
    return samplers.nfe(self.s.sampler, self.s.sampler_steps, guidance_lib.constant(PAPER_GUIDANCE))

  def diffusion_rows(self) -> list[dict]:
    s = self.s
    model = self.unet(s.unet_variant)
    params = self.unet_params(model, s.unet_latent, s.unet_context_tokens)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    macs = self.unet_macs(f"unet/{s.unet_variant}/{s.unet_latent}", model, s.unet_latent,
                          s.unet_context_tokens)
    x, t, ctx = map(self.put, self.unet_inputs(model, s.unet_batch, s.unet_latent,
                                               s.unet_context_tokens))
    fwd = lambda p, x, t, c: model.apply({"params": p}, x, t, c, train=False)
    compiled, compile_s = self.compile(fwd, params, x, t, ctx)
    call = lambda: jax.block_until_ready(compiled(params, x, t, ctx))
    name = f"UNet {s.unet_variant}"
    latent = f"{s.unet_latent}x{s.unet_latent}x{model.in_channels}"
    template = dict(section="diffusion", model=name, framework="jax", impl="forward",
                    batch=s.unet_batch, metric="img/s", params=n_params,
                    compile_seconds=compile_s, note=f"{latent} latent, {s.unet_context_tokens} "
                                                    "context token(s), t = 500")
    fwd_row = self.stats_row(template, self.timed(call), s.unet_batch, macs)
    fwd_row["value"] = fwd_row["images_per_second"]
    del compiled
    nfe = self.sampling_nfe()
    protocol = f"{s.sampler} {s.sampler_steps} + constant guidance {PAPER_GUIDANCE}, {nfe} NFE"
    implied = dict(section="diffusion", model=name, framework="jax",
                   impl="sampling (from forward)", batch=s.unet_batch, metric="samples/s",
                   value=fwd_row["images_per_second"] / nfe, params=n_params,
                   note=f"{protocol}: forward img/s / NFE")
    rows = [fwd_row, implied]
    if s.measure_sampling:
      rows.append(self.sampling_row(model, params, n_params, name, protocol))
    return rows

  def sampling_row(self, model, params, n_params: int, name: str, protocol: str) -> dict:
    s = self.s
    shape = (s.unet_batch, s.unet_latent, s.unet_latent, model.in_channels)
    schedule = schedule_lib.NoiseSchedule()
    _, _, ctx = self.unet_inputs(model, s.unet_batch, s.unet_latent, s.unet_context_tokens)
    null = jnp.zeros((1,) + ctx.shape[1:], jnp.float32)

    def draw(p, ctx, null, key):
      eps = lambda x, t, cond: model.apply({"params": p}, x, t, cond, train=False)
      g = guidance_lib.cfg(guidance_lib.constant(PAPER_GUIDANCE), ctx, null)
      x0, _ = samplers.sample(eps, shape, key, sampler=s.sampler, steps=s.sampler_steps,
                              schedule=schedule, guidance=g, dtype=self.dtype)
      return x0

    ctx, null, key = self.put((ctx, null, jax.random.key(3)))
    compiled, compile_s = self.compile(draw, params, ctx, null, key)
    call = lambda: jax.block_until_ready(compiled(params, ctx, null, key))
    times = bench.time_call(call, warmup=1, repeats=max(1, min(3, s.repeats)), min_seconds=0.0)
    template = dict(section="diffusion", model=name, framework="jax",
                    impl="sampling (measured)", batch=s.unet_batch, metric="samples/s",
                    params=n_params, compile_seconds=compile_s,
                    note=f"{protocol}: one jitted sampling run (lax.fori_loop), timed")
    r = self.stats_row(template, times, s.unet_batch, None)
    r["value"] = r["images_per_second"]
    return r

  def t2i_rows(self, latent: int) -> list[dict]:
    s = self.s
    model = self.unet(s.t2i_variant)
    params = self.unet_params(model, latent, s.t2i_tokens)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    macs = self.unet_macs(f"t2i/{s.t2i_variant}/{latent}", model, latent, s.t2i_tokens)
    x, t, ctx = map(self.put, self.unet_inputs(model, 1, latent, s.t2i_tokens))
    fwd = lambda p, x, t, c: model.apply({"params": p}, x, t, c, train=False)
    compiled, compile_s = self.compile(fwd, params, x, t, ctx)
    call = lambda: jax.block_until_ready(compiled(params, x, t, ctx))
    pixels = latent * 8
    name = f"T2I UNet {s.t2i_variant} {pixels}px"
    template = dict(section="t2i", model=name, framework="jax", impl="one evaluation",
                    batch=1, metric="ms/image", params=n_params, compile_seconds=compile_s,
                    note=f"{latent}x{latent}x{model.in_channels} latent, {s.t2i_tokens} text "
                         f"tokens of {model.context_dim}")
    r = self.stats_row(template, self.timed(call), 1, macs)
    r["value"] = 1e3 * r["seconds_median"]
    nfe = self.sampling_nfe()
    sample = dict(section="t2i", model=name, framework="jax", impl="sample (from evaluation)",
                  batch=1, metric="ms/image", value=nfe * r["value"], params=n_params,
                  note=f"{s.sampler} {s.sampler_steps} + guidance: {nfe} evaluations x one "
                       "evaluation's latency; no text encoder, no VAE decode")
    return [r, sample]

  # ---- segmentation --------------------------------------------------------------------------
  def segmentation_rows(self) -> list[dict]:
    s = self.s
    key = self.s.variants[0]
    backbone = ascan.AsCAN(num_classes=1, features_only=True, attention_impl="auto",
                           dtype=self.dtype, gelu="exact", table_image_size=s.image_size,
                           **self.classifier_kwargs(key))
    n = len(backbone.widths)  # UperNet on the last three stages (the paper: S2-S4), aux on S3.
    model = upernet.SegmentationModel(backbone=backbone, num_classes=150,
                                      feature_stages=tuple(range(max(1, n - 2), n + 1)),
                                      aux_stage=max(1, n - 1),
                                      channels=s.upernet_channels,
                                      aux_channels=max(8, s.upernet_channels // 2),
                                      dtype=self.dtype)
    size = s.upernet_size
    variables = self.classifier_variables(model, (1, size, size, 3))
    n_params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
    x = self.normal((1, size, size, 3))
    fwd = lambda v, x: model.apply(v, x, train=False)[0]
    compiled, compile_s = self.compile(fwd, variables, x)
    call = lambda: jax.block_until_ready(compiled(variables, x))
    template = dict(section="segmentation", model=f"UperNet-{variant_name(key)}",
                    framework="jax", impl="forward", batch=1, metric="FPS", params=n_params,
                    compile_seconds=compile_s,
                    note=f"{size}x{size}, 150 classes, single scale, no auxiliary head")
    r = self.stats_row(template, self.timed(call), 1, None)
    r["value"] = r["images_per_second"]
    return [r]

  # ---- attention sweep -----------------------------------------------------------------------
  def attention_impls(self) -> list[str]:
    impls = ["xla"]
    if self.platform == "gpu" and self.low_precision:
      impls.append("cudnn")
    if self.platform == "tpu":
      impls.append("pallas")
    return impls

  def attention_rows(self) -> list[dict]:
    """Each implementation on the classifier's (head dim 32) and the UNet's (64) shapes, with
    and without a dense bias; the choice per (head dim, length) is the fastest in total."""
    shapes = [(32, 49, 16), (32, 196, 8), (32, 784, 4), (32, 3136, 2),
              (64, 256, 10), (64, 1024, 5), (64, 4096, 5)]
    if self.s.preset == "tiny":
      shapes = [(8, 16, 2), (8, 64, 2)]
    batch = 16 if self.s.preset != "tiny" else 2
    results = []
    for head_dim, seq, heads in shapes:
      q, kk, v = (self.normal((batch, seq, heads, head_dim), self.dtype, seed=i)
                  for i in range(3))
      bias = self.normal((1, heads, seq, seq), seed=3)
      times = {}
      for impl in self.attention_impls():
        total = 0.0
        for b in (None, bias):
          fn = lambda q, k, v, b, impl=impl: attention.dot_product_attention(
              q, k, v, b, implementation=impl)
          try:
            compiled, _ = self.compile(fn, q, kk, v, b)
            call = lambda c=compiled, b=b: jax.block_until_ready(c(q, kk, v, b))
            total += float(np.median(self.timed(call)))
          except Exception as e:  # pylint: disable=broad-except
            total = float("nan")
            print(f"[report]   attention {impl} failed at {seq}x{head_dim}: {e}", flush=True)
            break
        times[impl] = total * 1e3
      usable = {i: t for i, t in times.items() if np.isfinite(t)}
      choice = min(usable, key=usable.get)
      results.append({"head_dim": head_dim, "seq_len": seq, "heads": heads, "batch": batch,
                      "ms_no_bias_plus_bias": times, "choice": choice})
    self.attention_sweep = results
    self.attention_choices = attention_table.entries_from_sweep(results, self.platform, self.device.device_kind,
                                                jnp.dtype(self.dtype).name)
    return []

  # ---- the plan ------------------------------------------------------------------------------
  def plan(self) -> list[tuple[float, str, str, Callable[[], list[dict]], dict]]:
    """The jobs by priority: what the issue asks to show first (AsCAN-T against MaxViT-T and
    ConvNeXt-T at the headline batch, AsCAN-B's training MFU), then the rest of the tables."""
    s = self.s
    want = set(s.sections)
    head = s.variants[0]
    hb = s.headline_batch
    first = [hb] if hb in s.batch_sizes else []
    others = [b for b in s.batch_sizes if b != hb]
    jobs = []

    def add(priority, kind, title, fn, section, model, **template):
      jobs.append((priority, kind, title, fn,
                   dict(section=section, model=model, framework=template.pop("framework", "jax"),
                        **template)))

    def skip(section, model, reason, **template):
      self.rows.append(dict(section=section, model=model, status="skipped", reason=reason,
                            framework=template.pop("framework", "jax"), **template))

    if "classification" in want:
      add(0, "infer", f"{variant_name(head)} auto {first}",
          lambda: self.infer_rows(head, "auto", first, profile=True), "classification",
          variant_name(head), impl="auto", batch=hb)
      add(3, "infer", f"{variant_name(head)} auto {others}",
          lambda: self.infer_rows(head, "auto", others), "classification", variant_name(head),
          impl="auto", batch=others)
      auto = set(self.resolved_impls(head, "auto"))
      for impl in self.attention_impls():
        if auto != {impl}:
          add(3.5, "infer", f"{variant_name(head)} {impl}",
              lambda impl=impl: self.infer_rows(head, impl, s.batch_sizes), "classification",
              variant_name(head), impl=impl, batch=list(s.batch_sizes))
      for i, key in enumerate(s.variants[1:]):
        add(6 + 0.1 * i, "infer", f"{variant_name(key)} auto",
            lambda key=key: self.infer_rows(key, "auto", s.batch_sizes), "classification",
            variant_name(key), impl="auto", batch=list(s.batch_sizes))
    if "peers" in want and s.peers:
      try:
        torch_peers.torch_device(self.platform)
        reason = ""
      except torch_peers.PeersUnavailable as e:
        reason = str(e)
      for i, name in enumerate(s.peers):
        template = dict(framework="pytorch", impl="")
        if reason:
          skip("classification", name, reason, batch=list(s.batch_sizes), **template)
          continue
        main_peer = name in ("MaxViT-T", "ConvNeXt-T")
        add((1 if main_peer else 7) + 0.1 * i, "peer", f"{name} {first}",
            lambda name=name: self.peer_rows(name, first), "classification", name, batch=hb,
            **template)
        add((7.5 if main_peer else 7.7) + 0.01 * i, "peer", f"{name} {others}",
            lambda name=name: self.peer_rows(name, others), "classification", name,
            batch=others, **template)
    if "train" in want:
      for i, key in enumerate(s.variants):
        priority = 2 if key == "B" or len(s.variants) == 1 else 4 if key == head else 9 + i
        add(priority, "train", f"{variant_name(key)} training step",
            lambda key=key: self.train_rows(key, profile=key == head), "train",
            variant_name(key), impl="train step")
    if "attention" in want and (len(self.attention_impls()) > 1 or s.preset == "tiny"):
      add(5, "attention", "attention sweep", self.attention_rows, "attention",
          "attention sweep")
    if "diffusion" in want:
      add(8, "unet", f"UNet {s.unet_variant}", self.diffusion_rows, "diffusion",
          f"UNet {s.unet_variant}", batch=s.unet_batch)
    if "segmentation" in want:
      add(8.5, "segmentation", "UperNet", self.segmentation_rows, "segmentation",
          f"UperNet-{variant_name(head)}", batch=1)
    for latent in s.t2i_latents if "t2i" in want else ():
      model = f"T2I UNet {s.t2i_variant} {latent * 8}px"
      if "t2i" in s.skip_reasons:
        skip("t2i", model, s.skip_reasons["t2i"], batch=1)
        continue
      add(10 + latent / 1e4, "t2i", f"T2I UNet {latent * 8}px",
          lambda latent=latent: self.t2i_rows(latent), "t2i", model, batch=1)
    return jobs

  def run(self) -> dict:
    self.run_jobs(self.plan())
    for pm in self.peer_models.values():
      pm.close()
    self._unet_params.clear()
    return self.result()

  def result(self) -> dict:
    s = self.s
    meta = {
        "device_kind": self.device.device_kind, "platform": self.platform,
        "devices_used": 1, "devices_present": jax.device_count(),
        "compute_dtype": jnp.dtype(self.dtype).name, "peak_flops": self.peak,
        "peak_source": self.peak_source, "jax_version": jax.__version__,
        "python": sys.version.split()[0], "host": platform_lib.node(),
        "cpu_count": os.cpu_count(), "torch": torch_peers.versions(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in dataclasses.asdict(s).items()},
        "wall_seconds": time.perf_counter() - self.start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m ascan_jax.tools.accelerator_report"] + self.argv),
    }
    return {"meta": meta, "rows": self.rows, "ratios": report_lib.ratios(self.rows),
            "profiles": self.profiles, "attention_sweep": self.attention_sweep,
            "attention_choices": self.attention_choices}


def parse_args(argv: list[str]) -> tuple[Settings, str]:
  p = argparse.ArgumentParser(prog="python -m ascan_jax.tools.accelerator_report",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output directory (created if needed)")
  size = p.add_mutually_exclusive_group()
  size.add_argument("--small", action="store_true", help="small settings for a CPU")
  size.add_argument("--tiny", action="store_true", help="tiny models (tests)")
  p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--batch_sizes", help="inference batches, comma-separated")
  p.add_argument("--train_batches", help="training batches to probe, comma-separated")
  p.add_argument("--variants", help="AsCAN variants, e.g. T,B,L")
  p.add_argument("--peers", help=f"timm peers, comma-separated, or 'none' "
                                 f"({','.join(torch_peers.PEERS)})")
  p.add_argument("--peer_compile", choices=torch_peers.COMPILE_MODES)
  p.add_argument("--warmup", type=int)
  p.add_argument("--repeats", type=int)
  p.add_argument("--min_seconds", type=float)
  p.add_argument("--deadline_s", type=float, help="skip rows that no longer fit; 0: none")
  a = p.parse_args(argv)
  s = dataclasses.replace(PRESETS["small" if a.small else "tiny" if a.tiny else "full"])
  ints = lambda text: tuple(int(x) for x in text.split(",") if x)
  names = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
  if a.sections:
    unknown = set(names(a.sections)) - set(SECTIONS)
    if unknown:
      p.error(f"--sections: unknown {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    s.sections = names(a.sections)
  if a.batch_sizes:
    s.batch_sizes = ints(a.batch_sizes)
    if s.headline_batch not in s.batch_sizes:
      s.headline_batch = s.batch_sizes[len(s.batch_sizes) // 2]
  if a.train_batches:
    s.train_batches = ints(a.train_batches)
  if a.variants:
    s.variants = names(a.variants)
    bad = [v for v in s.variants if v not in variants.VARIANTS and v != "tiny"]
    if bad:
      p.error(f"--variants: unknown {bad}; known: {', '.join(variants.VARIANTS)}")
  if a.peers:
    s.peers = () if a.peers == "none" else names(a.peers)
    bad = [x for x in s.peers if x not in torch_peers.PEERS]
    if bad:
      p.error(f"--peers: unknown {bad}; known: {', '.join(torch_peers.PEERS)} or none")
  for field in ("peer_compile", "warmup", "repeats", "min_seconds", "deadline_s"):
    if getattr(a, field) is not None:
      setattr(s, field, getattr(a, field))
  return s, a.out


def write(result: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(result, f, indent=1, default=lambda o: np.asarray(o).tolist())
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_lib.markdown(result))
  report_lib.plot(result, os.path.join(out_dir, "throughput.png"))
  if result["attention_choices"]:
    with open(os.path.join(out_dir, "attention_choices.json"), "w") as f:
      json.dump({"entries": result["attention_choices"]}, f, indent=1)


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  settings, out_dir = parse_args(argv)
  os.makedirs(out_dir, exist_ok=True)
  result = Report(settings, out_dir, argv).run()
  write(result, out_dir)
  print(report_lib.markdown(result), flush=True)
  return result


if __name__ == "__main__":
  main()
