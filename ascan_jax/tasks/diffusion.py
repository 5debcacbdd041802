"""Class-conditional diffusion with the AsCAN UNet (arXiv 2411.04967, sections 4.2 and A.7).

Model: ``ClassConditionalUNet`` = a learned class-token table (``ClassConditioner``; index
``num_classes`` is the null class of classifier-free guidance) feeding the UNet's
cross-attention. Objective: DDPM epsilon prediction with the scaled-linear schedule
(``config.diffusion``), labels dropped to the null class with probability ``label_dropout``,
optional offset noise; the loss is also reported per tenth of the timesteps (``train/loss_t<k>``).

Data: pixel space (``data.latent_dir`` empty: images in [-1, 1], ``data.channels`` channels,
optionally space-to-depth by ``data.patch`` as "simple diffusion" patches pixel-space inputs; the
embedded digits in ``:runlocal``) or cached VAE latents (``data.latent_dir``, written by
``tools.cache_latents``; samples are decoded with ``sample.vae_dir``).

Evaluation: the held-out denoising loss at fixed timesteps (raw and EMA, through the generic
evaluator); with ``eval.num_samples > 0``, samples judged by a classifier (``eval.judge_dir``:
class accuracy and classifier-feature Fréchet distance) and/or by the FID Inception against
reference statistics (``eval.inception_path``, ``eval.reference_path``: FID, sFID, IS,
precision, recall), the protocol written beside the numbers in ``DIR/samples``; a sample grid every
``sample.grid_every_steps``; ``--mode=sample`` writes a grid, an ``.npz`` and the protocol.
"""
from __future__ import annotations

import importlib.util
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ascan_jax import compute
from ascan_jax import fileio
from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.diffusion import generate
from ascan_jax.diffusion import samplers
from ascan_jax.diffusion import schedule as schedule_lib
from ascan_jax.models import conditioning
from ascan_jax.models import unet as unet_lib


class ClassConditionalUNet(nn.Module):
  """eps(x_t, t, labels): class labels -> context tokens -> the UNet."""
  unet: nn.Module
  conditioner: nn.Module

  def __call__(self, x, t, labels, train: bool = False):
    return self.unet(x, t, self.conditioner(labels), None, train=train)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (each p x p patch becomes channels)."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of ``space_to_depth``."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def load_config_file(spec: str):
  """``path.py[:arg]`` -> ``get_config(arg)``, the way ``--config`` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("ascan_judge_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


class Task:
  """The diffusion task; see the module docstring."""
  name = "diffusion"
  default_metric = ""

  def __init__(self, config):
    self.config = config
    d = config.diffusion
    self.dtype = compute.compute_dtype(config.model.dtype)
    self.schedule = schedule_lib.NoiseSchedule(num_train_steps=d.num_train_steps,
                                               beta_start=d.beta_start, beta_end=d.beta_end,
                                               kind=d.schedule)
    self.latent_meta = None
    if config.data.latent_dir:
      try:
        self.latent_meta = latents_lib.read_metadata(config.data.latent_dir)
      except sources.DatasetNotFoundError as e:  # summary/bench need no data: assume the shape.
        s, f = config.data.image_size, config.data.latent_downsample
        self.latent_meta = {"latent_shape": [s // f, s // f, config.data.latent_channels],
                            "missing": str(e)}
    self.null_label = config.data.num_classes
    self.model = self.build_model()
    self._sources = {}
    self._generators = {}
    self._judge = None
    self._inception = None
    self._real_features = None
    self._vae = None

  # ---- model -------------------------------------------------------------------------------
  def sample_shape(self) -> tuple[int, int, int]:
    if self.latent_meta is not None:
      return tuple(self.latent_meta["latent_shape"])
    s, p = self.config.data.image_size, self.config.data.patch
    return (s // p, s // p, p * p * self.config.data.channels)

  def build_model(self, **overrides) -> nn.Module:
    m = self.config.model
    channels = self.sample_shape()[-1]
    kwargs = dict(channels=tuple(m.channels), down_layout=m.down_layout,
                  mid_layout=m.mid_layout, up_layout=m.up_layout or None,
                  in_channels=channels, out_channels=channels, head_dim=m.head_dim,
                  expand_ratio=m.expand_ratio,
                  context_dim=m.context_dim, norm_groups=m.norm_groups,
                  drop_path_rate=m.drop_path_rate, attention_impl=m.attention_impl,
                  remat_policy=m.remat_policy, dtype=self.dtype)
    kwargs.update(overrides)
    return ClassConditionalUNet(
        unet=unet_lib.AsCANUNet(**kwargs),
        conditioner=conditioning.ClassConditioner(self.config.data.num_classes, m.context_dim,
                                                  m.context_tokens))

  def init_variables(self, key, model=None):
    model = model or self.model
    x = jnp.zeros((1,) + self.sample_shape(), jnp.float32)
    return model.init({"params": key, "dropout": key}, x, jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))

  def _input_key(self) -> str:
    return "latent" if self.latent_meta is not None else "image"

  def input_spec(self, batch_size: int, train: bool = True) -> dict:
    if self.latent_meta is not None:
      x = jax.ShapeDtypeStruct((batch_size,) + self.sample_shape(), jnp.float32)
    else:
      s = self.config.data.image_size
      x = jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8)
    return {self._input_key(): x, "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def synthetic_batch(self, batch_size: int, key) -> dict:
    spec = self.input_spec(batch_size)
    k1, k2 = jax.random.split(key)
    x = spec[self._input_key()]
    if x.dtype == jnp.uint8:
      value = jax.random.randint(k1, x.shape, 0, 256).astype(jnp.uint8)
    else:
      value = jax.random.normal(k1, x.shape)
    return {self._input_key(): value,
            "label": jax.random.randint(k2, (batch_size,), 0, self.config.data.num_classes),
            "mask": jnp.ones((batch_size,), jnp.float32)}

  def x0(self, batch) -> jax.Array:
    if self.latent_meta is not None:
      return batch["latent"].astype(jnp.float32)
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return space_to_depth(x[..., :self.config.data.channels], self.config.data.patch)

  def forward(self, variables, batch, model=None):
    """One denoiser evaluation at t = T/2 (what summary and bench count and time)."""
    model = model or self.model
    x = self.x0(batch)
    t = jnp.full((x.shape[0],), self.schedule.num_train_steps / 2, jnp.float32)
    return model.apply(variables, x, t, batch["label"], train=False)

  # ---- data --------------------------------------------------------------------------------
  def source(self, split: str):
    if split not in self._sources:
      if self.latent_meta is not None and "missing" in self.latent_meta:
        raise sources.DatasetNotFoundError(self.latent_meta["missing"])
      if self.latent_meta is not None:
        self._sources[split] = latents_lib.LatentSource(self.config.data.latent_dir, split)
      else:
        self._sources[split] = sources.get_source(self.config.data, split)
    return self._sources[split]

  def codec(self):
    if self.latent_meta is not None:
      return latents_lib.LatentCodec(self.latent_meta, flip=self.config.data.flip)
    import ml_collections
    aug = ml_collections.ConfigDict(dict(
        random_resized_crop=False, crop_min_scale=1.0, flip=self.config.data.flip,
        randaugment_layers=0, randaugment_magnitude=0, color_jitter=0.0))
    return pipeline.ImageCodec(self.config.data.image_size, aug,
                               self.config.data.eval_crop_fraction)

  def num_train_examples(self) -> int:
    return len(self.source(self.config.data.train_split))

  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    return pipeline.train_dataset(self.source(self.config.data.train_split), self.codec(),
                                  self.config, sharding, total_steps, start_step)

  def eval_batches(self, sharding):
    return pipeline.eval_dataset(self.source(self.config.data.eval_split), self.codec(),
                                 self.config, sharding)

  # ---- training ----------------------------------------------------------------------------
  def _bucket_metrics(self, prefix, t, per_example, mask):
    n = self.config.diffusion.loss_buckets
    sums, counts = schedule_lib.bucket_sums(t, per_example, n, self.schedule.num_train_steps,
                                            weights=mask)
    return sums, counts, {f"{prefix}_t{k}": jnp.where(counts[k] > 0,
                                                       sums[k] / jnp.maximum(counts[k], 1.0), 0.0)
                          for k in range(n)}

  def loss_fn(self, params, model_state, batch, key):
    d = self.config.diffusion
    k_t, k_noise, k_drop, k_path = jax.random.split(key, 4)
    x0 = self.x0(batch)
    mask = batch["mask"]
    labels = jnp.where(jax.random.bernoulli(k_drop, d.label_dropout, batch["label"].shape),
                       self.null_label, batch["label"])
    t = schedule_lib.sample_timesteps(k_t, x0.shape[0], self.schedule.num_train_steps)
    noise = schedule_lib.sample_noise(k_noise, x0.shape, d.offset_noise)
    x_t = schedule_lib.q_sample(self.schedule, x0, t, noise)
    eps = self.model.apply({"params": params, **model_state}, x_t, t.astype(jnp.float32),
                           labels, train=True, rngs={"dropout": k_path})
    per_example = schedule_lib.epsilon_loss(eps, noise)
    loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    _, _, buckets = self._bucket_metrics("train/loss", t, per_example, mask)
    return loss, (model_state, buckets)

  # ---- evaluation --------------------------------------------------------------------------
  def eval_fn(self, params, model_state, batch) -> dict:
    """Held-out denoising loss at timesteps spread evenly over each batch (fixed noise)."""
    x0 = self.x0(batch)
    b = x0.shape[0]
    steps = self.schedule.num_train_steps
    t = jnp.floor((jnp.arange(b) + 0.5) * steps / b).astype(jnp.int32)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(1234), i),
                                                 x0.shape[1:]))(jnp.arange(b))
    x_t = schedule_lib.q_sample(self.schedule, x0, t, noise)
    eps = self.model.apply({"params": params, **model_state}, x_t, t.astype(jnp.float32),
                           batch["label"], train=False)
    per_example = schedule_lib.epsilon_loss(eps, noise)
    mask = batch["mask"]
    sums, counts, _ = self._bucket_metrics("eval/loss", t, per_example, mask)
    out = {"loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
    for k in range(self.config.diffusion.loss_buckets):
      out[f"loss_t{k}_sum"] = sums[k]
      out[f"loss_t{k}_count"] = counts[k]
    return out

  def summarize_eval(self, sums: dict) -> dict:
    out = {"loss": sums["loss"] / max(sums["count"], 1.0), "examples": int(sums["count"])}
    for k in range(self.config.diffusion.loss_buckets):
      out[f"loss_t{k}"] = sums[f"loss_t{k}_sum"] / max(sums[f"loss_t{k}_count"], 1.0)
    return out

  # ---- sampling ----------------------------------------------------------------------------
  def decoder(self):
    """(fn(vae_params, x0) -> uint8 images, vae_params or None)."""
    if self.latent_meta is None:
      p = self.config.data.patch
      return (lambda _, x0: generate.to_uint8(depth_to_space(x0, p))), None
    if not self.config.sample.vae_dir:
      raise ValueError("config.sample.vae_dir: latent samples need the VAE that decodes them "
                       f"(the cache was written with {self.latent_meta.get('vae_dir')})")
    from ascan_jax.models import vae as vae_lib
    if self._vae is None:
      self._vae = vae_lib.from_pretrained(self.config.sample.vae_dir)
    model, params = self._vae

    def decode(vae_params, z):
      images = vae_lib.decode(model, vae_params, vae_lib.from_model_latents(z, model.config))
      return generate.to_uint8(images)
    return decode, params

  def generator(self, setup) -> generate.Generator:
    key = id(setup.mesh)
    if key not in self._generators:
      self._generators[key] = generate.Generator(self, setup.mesh, setup.rules,
                                                 setup.state_shardings.params,
                                                 self.config.sample.batch_size)
    return self._generators[key]

  def _grid_labels(self) -> np.ndarray:
    s = self.config.sample
    classes = list(s.classes) or list(range(min(self.config.data.num_classes, 10)))
    return np.repeat(np.asarray(classes, np.int32), s.per_class)

  def on_step(self, state, setup, step: int, workdir: str) -> None:
    """A sample grid every ``sample.grid_every_steps`` steps, in ``DIR/samples``."""
    every = self.config.sample.grid_every_steps
    if every <= 0 or step % every:
      return
    gen = self.generator(setup)
    s = self.config.sample
    params = state.ema_params if s.ema else state.params
    labels = self._grid_labels()
    images = gen(params, labels, s.seed)
    if jax.process_index() == 0:
      generate.write_outputs(fileio.join(workdir, "samples"),
                             f"grid_step{step:07d}_{gen.tag(s.seed, s.ema)}", images, labels,
                             gen.protocol(step=step, ema=s.ema, num_samples=len(labels),
                                          seed=s.seed), columns=s.per_class)

  def _load_judge(self):
    if self._judge is None:
      from ascan_jax.eval import judge as judge_lib
      e = self.config.eval
      if e.train_judge:
        judge_lib.ensure_trained(load_config_file(e.judge_config), e.judge_dir)
      self._judge = judge_lib.Judge.from_workdir(e.judge_dir)
      if self._judge.image_size != self.config.data.image_size:
        raise ValueError(f"the judge in {e.judge_dir} takes {self._judge.image_size}px images, "
                         f"the samples are {self.config.data.image_size}px")
      self._real_features = self._judge.real_features(limit=e.real_samples)
    return self._judge

  def bench_sampling(self, result: dict) -> dict:
    """Whole samples per second: NFE of the configured sampler, the rate implied by the measured
    forward throughput at the largest benchmarked batch and, with ``bench.measure_sampling``, a
    timed sampling run of that many samples (the paper's Table 4 uses batch 64)."""
    s = self.config.sample
    nfe = samplers.nfe(s.sampler, s.steps, generate.guidance_schedule(s))
    batch = max(int(b) for b in result["inference"])
    fwd = result["inference"][str(batch)]["examples_per_second"]
    out = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
           "nfe_per_sample": nfe, "batch": batch,
           "samples_per_second_from_forward": fwd / nfe}
    if self.config.bench.measure_sampling:
      from ascan_jax.train import setup as setup_lib
      setup = setup_lib.build(self, self.config, self.config.batch_size * 1000)
      state = setup_lib.create_state(setup)
      gen = generate.Generator(self, setup.mesh, setup.rules, setup.state_shardings.params,
                               batch)
      labels = np.arange(batch) % self.config.data.num_classes
      gen(state.params, labels, 0)  # compile
      t0 = time.perf_counter()
      gen(state.params, labels, 1)
      out["samples_per_second_measured"] = batch / (time.perf_counter() - t0)
    return out

  def _load_inception(self):
    if self._inception is None:
      from ascan_jax.eval import inception_evaluator
      e = self.config.eval
      self._inception = inception_evaluator.InceptionEvaluator(e.inception_path,
                                                               e.reference_path)
    return self._inception

  def sample_evaluation(self, state, setup, step: int, workdir: str) -> dict:
    """Metrics of ``eval.num_samples`` class-balanced samples (EMA by default): the judge's
    class accuracy and feature distance, and/or FID, sFID, IS, precision and recall."""
    e = self.config.eval
    use_judge = bool(e.judge_dir)
    use_inception = bool(e.inception_path and e.reference_path)
    if e.num_samples <= 0 or not (use_judge or use_inception):
      return {}
    gen = self.generator(setup)
    s = self.config.sample
    num_classes = self.config.data.num_classes
    labels = np.arange(e.num_samples, dtype=np.int32) % num_classes
    params = state.ema_params if s.ema else state.params
    seed = s.seed + 1  # not the grid's seed.
    images = gen(params, labels, seed)
    protocol = gen.protocol(step=step, ema=s.ema, num_samples=len(labels), seed=seed)
    metrics = {}
    if use_judge:
      judge = self._load_judge()
      metrics.update({f"eval/{k}": v for k, v in
                      judge.evaluate(images, labels, self._real_features).items()})
      protocol.update(judge_dir=judge.workdir, judge_step=judge.step,
                      judge_real_samples=len(self._real_features))
    if use_inception:
      inception = self._load_inception()
      metrics.update({f"eval/{k}": v for k, v in inception.evaluate(images).items()})
      protocol.update(inception.protocol(len(images)))
    name = f"eval_step{step:07d}_{gen.tag(seed, s.ema)}"
    if jax.process_index() == 0:
      protocol["metrics"] = metrics
      order = np.argsort(labels[:100], kind="stable")
      generate.write_outputs(fileio.join(workdir, "samples"), name,
                             images[:100][order], labels[:100][order], protocol,
                             columns=max(1, min(10, len(order) // max(1, num_classes))))
    metrics["eval/sample_protocol"] = f"samples/{name}.json"
    metrics["eval/sample_nfe"] = gen.nfe()
    return metrics

  def sample(self, config, workdir: str) -> dict:
    """``--mode=sample``: a grid, an .npz and the protocol for ``sample.classes`` x seeds."""
    from ascan_jax.train import checkpoint as checkpoint_lib
    from ascan_jax.train import setup as setup_lib
    ckpt = checkpoint_lib.Checkpointer(workdir, config, best_metric="")
    step = config.checkpoint.step if config.checkpoint.step >= 0 else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                              f"{ckpt.directory} to sample from; available: {ckpt.all_steps()}")
    setup = setup_lib.build(self, config, self.num_train_examples())
    state, _, _ = ckpt.restore(step, setup.abstract_state)
    ckpt.close()
    s = config.sample
    params = state.ema_params if s.ema else state.params
    labels = self._grid_labels() if not s.classes else np.repeat(
        np.asarray(s.classes, np.int32), s.per_class)
    gen = self.generator(setup)
    images = gen(params, labels, s.seed, progress=jax.process_index() == 0)
    paths = {}
    if jax.process_index() == 0:
      protocol = gen.protocol(step=step, ema=s.ema, num_samples=len(labels), seed=s.seed)
      paths = generate.write_outputs(fileio.join(workdir, "samples"),
                                     f"sample_step{step:07d}_{gen.tag(s.seed, s.ema)}", images,
                                     labels, protocol, columns=s.per_class)
      print(f"wrote {len(labels)} samples: {paths['png']}, {paths['npz']}, {paths['json']}",
            flush=True)
      logging.info("samples: %s", paths)
    return paths
