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

Evaluation (``config.evals``): ``dataset`` = the held-out denoising loss at fixed timesteps (raw
and EMA in one pass); ``diffusion_samples`` = with ``num_samples > 0``, samples judged by a
classifier (``judge_dir``: class accuracy and classifier-feature Fréchet distance) and/or by the
FID Inception against reference statistics (``inception_path``, ``reference_path``: FID, sFID,
IS, precision, recall), the protocol written beside the numbers in ``DIR/samples``;
``sample_grid`` = a sample grid. ``--mode=sample`` writes a grid, an ``.npz`` and the protocol
(``tasks.diffusion_sampling``). A judge that must be trained first (``train_judge``) is a
prerequisite run of the modes, not something the task trains.
"""
from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ascan_jax import compute
from ascan_jax import config_defaults
from ascan_jax import config_validation as cv
from ascan_jax.data import latents as latents_lib
from ascan_jax.data import pipeline
from ascan_jax.data import sources
from ascan_jax.diffusion import generate
from ascan_jax.models import conditioning
from ascan_jax.tasks import base
from ascan_jax.tasks import denoising
from ascan_jax.tasks import diffusion_sampling
from ascan_jax.tasks import evaluators as evaluators_lib


class ClassConditionalUNet(nn.Module):
  """eps(x_t, t, labels): class labels -> context tokens -> the UNet."""
  unet: nn.Module
  conditioner: nn.Module

  def __call__(self, x, t, labels, train: bool = False):
    return self.unet(x, t, self.conditioner(labels), None, train=train)


def load_config_file(spec: str):
  """``path.py[:arg]`` -> ``get_config(arg)``, the way ``--config`` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("ascan_judge_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def default_config() -> ml_collections.ConfigDict:
  """Class-conditional diffusion with the AsCAN UNet (paper sections 4.2 and A.7)."""
  c = config_defaults.base()
  c.task = "diffusion"
  c.batch_size = 2048
  c.eval_batch_size = 256
  c.total_epochs = 1000.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "ascan_unet"
  denoising.add_model_keys(c.model, channels=(160, 320, 640), down_layout="CCC-CCTT-C" + "T" * 20,
                           context_dim=768)
  c.model.context_tokens = 1  # learned tokens per class label.

  c.diffusion = denoising.diffusion_schema()
  c.diffusion.label_dropout = 0.1  # classifier-free guidance training.

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"  # the images (for latent caching, pixel-space training, judges).
  c.data.data_dir = ""
  c.data.latent_dir = ""  # set: train on the latent cache there (tools.cache_latents).
  c.data.latent_channels = 4  # the latent shape when the cache is absent (summary, bench);
  c.data.latent_downsample = 8  # the cache's metadata wins when it exists (SD VAE: 4, x8).
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 256
  c.data.channels = 3  # pixel space only: 1 trains on grey images.
  c.data.patch = 1  # pixel space only: space-to-depth by p (the UNet sees H/p x W/p x p*p*C).
  c.data.num_classes = 1000
  c.data.eval_crop_fraction = 1.0  # centre crop of the full short side (ADM's preprocessing).
  c.data.flip = True
  c.data.shuffle = "index_shuffle"  # index_shuffle | permutation (see ascan_jax.data.order).
  c.data.worker_count = 0
  c.data.worker_buffer_size = 2
  c.data.holdout_fraction = 0.2

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "heun"  # ddpm | ddim | euler | heun | dpmpp_2m
  c.sample.steps = 30
  c.sample.spacing = ""  # empty: the sampler's default.
  c.sample.guidance = "constant"  # none | constant | interval | ramp
  c.sample.scale = 1.78  # constant scale (paper); the ramp's start scale is ramp_start.
  c.sample.ramp_start = 1.1
  c.sample.ramp_end = 3.6
  c.sample.start_step = 5  # interval / ramp: 1-indexed first guided step ...
  c.sample.end_step = -1  # ... and last (-1: the last step).
  c.sample.classes = ()  # grids and --mode=sample: empty means the first 10 classes.
  c.sample.per_class = 4
  c.sample.seed = 0
  c.sample.ema = True
  c.sample.batch_size = 64
  c.sample.vae_dir = ""  # latents: the diffusers VAE that decodes samples to images.
  c.sample.clip_denoised = 0.0  # > 0: clip x0 estimates to [-c, c] (pixel space: 1.0).

  c.evals.val = config_defaults.dataset_evaluator()  # eval/loss, eval/ema_loss, eval/loss_t<k>
  c.evals.val.every_steps = 10000
  c.evals.samples = diffusion_sampling.samples_evaluator_schema()  # off until num_samples > 0.
  c.evals.grid = diffusion_sampling.grid_evaluator_schema()
  pipeline.add_config_keys(c)  # loading (workers, threads, batching) keys.

  denoising.set_optim(c.optim, 6e-4)
  c.checkpoint.best_metric = ""
  return c


def check_config(config) -> None:
  """Values of the diffusion task that cannot work."""
  m, s, d = config.model, config.sample, config.diffusion
  cv.check_model_common(config)
  denoising.check_sampler(s)
  cv.require(s.per_class >= 1, "sample.per_class", "must be >= 1")
  cv.require(0.0 <= d.label_dropout < 1.0, "diffusion.label_dropout", "must be in [0, 1)")
  denoising.check_config(config)
  data = config.data
  if not data.latent_dir:
    factor = 2 ** (len(m.channels) - 1) * data.patch
    cv.require(data.image_size % factor == 0, "data.image_size",
               f"{data.image_size} is not divisible by {factor} (the UNet's "
               f"{len(m.channels)} levels x data.patch {data.patch})")
    cv.require(data.channels in (1, 3), "data.channels", "must be 1 or 3")
  cv.require(data.num_classes >= 2, "data.num_classes", "must be at least 2")
  cv.require(0.0 < data.holdout_fraction < 1.0, "data.holdout_fraction", "must be in (0, 1)")
  cv.check_choice(config, "data.shuffle", ("index_shuffle", "permutation"))
  cv.check_choice(config, "data.batching", pipeline.BATCHING)
  cv.require(data.worker_threads >= 1, "data.worker_threads", "must be >= 1")
  for name in config.evals.keys():
    e = config.evals[name]
    if e.type != "diffusion_samples":
      continue
    key = f"evals.{name}"
    if e.num_samples > 0:
      cv.require(bool(e.judge_dir) or bool(e.inception_path and e.reference_path),
                 f"{key}.num_samples",
                 "sample metrics need a judge classifier (judge_dir) or the FID Inception and "
                 "reference statistics (inception_path, reference_path)")
    cv.require(bool(e.inception_path) == bool(e.reference_path), f"{key}.reference_path",
               "inception_path and reference_path go together")
    if e.train_judge:
      cv.require(bool(e.judge_config), f"{key}.judge_config",
                 "train_judge needs the judge's config file (e.g. configs/ascan_t.py:runlocal)")


@base.register
class Task(base.Task):
  """The diffusion task; see the module docstring."""
  name = "diffusion"
  default_metric = ""

  @classmethod
  def default_config(cls):
    return default_config()

  @classmethod
  def validate(cls, config, *, num_devices, num_processes, mode):
    check_config(config)
    denoising.pixel_width_warning(config)

  @classmethod
  def evaluator_schemas(cls):
    return {"dataset": config_defaults.dataset_evaluator,
            "diffusion_samples": diffusion_sampling.samples_evaluator_schema,
            "sample_grid": diffusion_sampling.grid_evaluator_schema}

  def __init__(self, config):
    super().__init__(config)
    self.dtype = compute.compute_dtype(config.model.dtype)
    self.schedule = denoising.noise_schedule(config)
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
    self._vae = None

  # ---- model -------------------------------------------------------------------------------
  def sample_shape(self) -> tuple[int, int, int]:
    if self.latent_meta is not None:
      return tuple(self.latent_meta["latent_shape"])
    s, p = self.config.data.image_size, self.config.data.patch
    return (s // p, s // p, p * p * self.config.data.channels)

  def build_model(self, **overrides) -> nn.Module:
    m = self.config.model
    return ClassConditionalUNet(
        unet=denoising.unet(self.config, self.sample_shape()[-1], self.dtype, **overrides),
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
    return denoising.space_to_depth(x[..., :self.config.data.channels],
                                    self.config.data.patch)

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
    return pipeline.ImageCodec(
        self.config.data.image_size, aug, self.config.data.eval_crop_fraction,
        resize_small_squares=pipeline.eval_resize_small_squares(self.config.data))

  def num_train_examples(self) -> int:
    return len(self.source(self.config.data.train_split))

  def train_batches(self, sharding, total_steps: int, start_step: int = 0):
    return pipeline.train_dataset(self.source(self.config.data.train_split), self.codec(),
                                  self.config, sharding, total_steps, start_step)

  def eval_batches(self, sharding, split: str):
    return pipeline.eval_dataset(self.source(split), self.codec(), self.config, sharding)

  # ---- training ----------------------------------------------------------------------------
  def loss_fn(self, params, model_state, batch, key):
    d = self.config.diffusion
    k_t, k_noise, k_drop, k_path = jax.random.split(key, 4)
    labels = jnp.where(jax.random.bernoulli(k_drop, d.label_dropout, batch["label"].shape),
                       self.null_label, batch["label"])

    def net_fn(x_t, t):
      return self.model.apply({"params": params, **model_state}, x_t, t, labels, train=True,
                              rngs={"dropout": k_path})
    loss, buckets = denoising.train_loss(net_fn, self.schedule, self.x0(batch), batch["mask"],
                                         k_t, k_noise, offset_noise=d.offset_noise,
                                         loss_buckets=d.loss_buckets, prediction=d.prediction,
                                         loss_on=d.loss_on, min_snr_gamma=d.min_snr_gamma)
    return loss, (model_state, buckets)

  # ---- evaluation --------------------------------------------------------------------------
  def eval_fn(self, params, model_state, batch) -> dict:
    """Held-out denoising loss at timesteps spread evenly over each batch (fixed noise)."""
    def net_fn(x_t, t):
      return self.model.apply({"params": params, **model_state}, x_t, t, batch["label"],
                              train=False)
    eps_fn = denoising.denoiser(net_fn, self.schedule, self.config.diffusion.prediction)
    return denoising.eval_sums(eps_fn, self.schedule, self.x0(batch), batch["mask"],
                               loss_buckets=self.config.diffusion.loss_buckets)

  def summarize_eval(self, sums: dict) -> dict:
    return denoising.summarize_eval(sums, self.config.diffusion.loss_buckets)

  # ---- sampling ----------------------------------------------------------------------------
  def decoder(self):
    """(fn(vae_params, x0) -> uint8 images, vae_params or None)."""
    if self.latent_meta is None:
      return denoising.decoder(self.config.data.patch)
    if not self.config.sample.vae_dir:
      raise ValueError("config.sample.vae_dir: latent samples need the VAE that decodes them "
                       f"(the cache was written with {self.latent_meta.get('vae_dir')})")
    from ascan_jax.models import vae as vae_lib
    if self._vae is None:
      self._vae = vae_lib.from_pretrained(self.config.sample.vae_dir)
    return denoising.decoder(vae=self._vae)

  def generator(self, setup) -> generate.Generator:
    key = id(setup.mesh)
    if key not in self._generators:
      self._generators[key] = generate.Generator(self, setup.mesh, setup.rules,
                                                 setup.state_shardings.params,
                                                 self.config.sample.batch_size)
    return self._generators[key]

  def prerequisites(self, workdir: str | None = None):
    """The judge classifier of each ``diffusion_samples`` evaluator with ``train_judge``."""
    del workdir  # its runs have their own workdirs in the config.
    from ascan_jax.tasks import judge as judge_lib  # pylint: disable=g-import-not-at-top
    out = []
    for name in self.config.evals.keys():
      e = self.config.evals[name]
      if e.type == "diffusion_samples" and e.num_samples > 0 and e.train_judge:
        judge_config = load_config_file(e.judge_config)
        if not judge_lib.is_trained(judge_config, e.judge_dir):
          out.append((judge_config, e.judge_dir))
    return out

  def make_evaluators(self, setup) -> dict:
    from ascan_jax.tasks import judge as judge_lib  # pylint: disable=g-import-not-at-top
    out = evaluators_lib.build_standard(self, setup)
    for name in self.config.evals.keys():
      cfg = self.config.evals[name]
      if cfg.type == "diffusion_samples":
        out[name] = diffusion_sampling.SampleMetricsEvaluator(
            name, cfg, self, self.generator(setup), judge_lib.Judge.from_workdir)
      elif cfg.type == "sample_grid":
        out[name] = diffusion_sampling.GridEvaluator(name, cfg, self, self.generator(setup))
    return out

  def sample(self, context, workdir: str) -> dict:
    return diffusion_sampling.sample_mode(self, context, workdir)

  def bench_extra(self, result: dict, make_context) -> dict:
    return {"sampling": diffusion_sampling.bench_sampling(self, result, make_context)}
