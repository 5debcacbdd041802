"""Every config key a task understands, with its default: the schema configs are checked against.

A config file starts from one of these functions and changes values; ``config_validation``
rejects any key that is not here (a typo in a config file or on the command line), a value of the
wrong type, and impossible values. Durations are written as epochs or steps and resolved by the
loop; nothing here is derived from anything else, so overrides never leave stale values behind.
This module imports no JAX, so config files stay cheap to load.
"""
from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes. With the default mesh (data=-1, fsdp=1, tensor=1) this is plain data
# parallelism; setting mesh.shape to (1, -1, 1) gives FSDP and (d, 1, t) tensor parallelism, with
# the same rules. A mesh axis is used at most once per array (first rule wins), and an axis that
# does not divide a dimension is dropped for that array (see ascan_jax.parallel.sharding).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("classes", "tensor"),
    ("height", None),
    ("width", None),
    ("length", None),
)


def base() -> ml_collections.ConfigDict:
  """Keys shared by every task: seed, duration, optimizer, mesh, checkpoints, logging, bench."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.batch_size = 256  # global batch per optimizer step, over all processes and devices.
  c.eval_batch_size = 256
  c.total_epochs = 1.0
  c.total_steps = -1  # > 0 takes precedence over total_epochs.
  c.microbatches = 1  # gradient accumulation: the batch is split and scanned.

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.peak_lr = 1e-3
  c.optim.init_lr = 5e-7  # linear warm-up starts here ...
  c.optim.end_lr = 5e-6  # ... and cosine decay ends here.
  c.optim.warmup_epochs = 0.0
  c.optim.warmup_steps = -1  # >= 0 takes precedence over warmup_epochs.
  c.optim.weight_decay = 0.05  # not applied to norms and biases.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # <= 0 disables clipping.
  c.optim.ema_decay = 0.9999  # 0 disables the EMA.
  c.optim.ema_warmup = False  # decay_t = min(ema_decay, (1 + t) / (10 + t)) (short runs).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # one axis may be -1: all remaining devices.
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.rules = DEFAULT_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3  # the last N checkpoints ...
  c.checkpoint.keep_best = True  # ... plus the best by eval metric.
  c.checkpoint.best_metric = ""  # empty: the task's default metric.
  c.checkpoint.async_save = True
  c.checkpoint.step = -1  # --mode=eval: evaluate this step instead of the latest.

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True
  c.log.transfer_guard = False  # jax_transfer_guard='disallow' in the train loop.

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000  # also evaluated at the last step.
  c.eval.ema = True  # evaluate the EMA parameters as well as the raw ones.

  c.bench = ml_collections.ConfigDict()
  c.bench.batch_sizes = (1, 16, 64)
  c.bench.train_batch_size = 64
  c.bench.warmup = 3
  c.bench.repeats = 10
  c.bench.min_seconds = 1.0  # each timing repeats the call until this much time has passed.
  c.bench.measure_sampling = False  # generative tasks: also time full sampling at batch 64.

  c.summary = ml_collections.ConfigDict()
  c.summary.memory_batch_size = 64
  return c


def classification() -> ml_collections.ConfigDict:
  """The classification task's keys; values follow AsCAN-T's paper recipe (appendix A.2)."""
  c = base()
  c.task = "classification"
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.total_epochs = 300.0
  c.label_smoothing = 0.1

  c.model = ml_collections.ConfigDict()
  c.model.name = "ascan"
  c.model.layout = "C-CCCT-CCTT-CTTT"
  c.model.widths = (64, 128, 256, 512)
  c.model.stem_width = 64
  c.model.embed_dim = 1280
  c.model.head_dim = 32
  c.model.mlp_ratio = 4
  c.model.expand_ratio = 4
  c.model.se_ratio = 0.25
  c.model.drop_path_rate = 0.3
  c.model.head_dropout = 0.0
  c.model.bn_momentum = 0.9
  c.model.attention_impl = "auto"  # auto | xla | cudnn | pallas
  c.model.remat_policy = "none"  # none | full | dots | dots_no_batch
  c.model.dtype = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"  # imagenet2012 | array_record | embedded_mnist | embedded_digits
  c.data.data_dir = ""  # tfds data_dir, or the folder written by tools.folder_to_array_record.
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.eval_crop_fraction = 0.875  # resize to size / fraction, then centre-crop (224 <- 256).
  c.data.worker_count = 0  # grain worker processes per host; 0 decodes in the main process.
  c.data.worker_buffer_size = 2
  c.data.holdout_fraction = 0.2  # embedded datasets only: share kept for evaluation.

  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = True
  c.augment.crop_min_scale = 0.08
  c.augment.flip = True
  c.augment.randaugment_layers = 2
  c.augment.randaugment_magnitude = 15
  c.augment.color_jitter = 0.4
  c.augment.mixup_alpha = 0.8
  c.augment.cutmix_alpha = 1.0
  c.augment.mix_prob = 1.0
  c.augment.cutmix_switch_prob = 0.5

  c.checkpoint.best_metric = "eval/top1"
  return c


def diffusion() -> ml_collections.ConfigDict:
  """Class-conditional diffusion with the AsCAN UNet (paper sections 4.2 and A.7)."""
  c = base()
  c.task = "diffusion"
  c.batch_size = 2048
  c.eval_batch_size = 256
  c.total_epochs = 1000.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "ascan_unet"
  c.model.channels = (160, 320, 640)
  c.model.down_layout = "CCC-CCTT-C" + "T" * 20
  c.model.mid_layout = "CTC"
  c.model.up_layout = ""  # empty: mirrors down_layout.
  c.model.head_dim = 64
  c.model.expand_ratio = 4  # C blocks' 3x3 expansion (the paper's FusedMBConv: 4).
  c.model.context_dim = 768
  c.model.context_tokens = 1  # learned tokens per class label.
  c.model.norm_groups = 32
  c.model.drop_path_rate = 0.0
  c.model.attention_impl = "auto"
  c.model.remat_policy = "none"
  c.model.dtype = "auto"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_train_steps = 1000
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.01  # 0.01 at 256x256, 0.02 at 512 and above (paper).
  c.diffusion.schedule = "scaled_linear"  # scaled_linear | linear
  c.diffusion.offset_noise = 0.0
  c.diffusion.label_dropout = 0.1  # classifier-free guidance training.
  c.diffusion.loss_buckets = 10  # train/loss_t<k>: the loss per tenth of the timesteps.

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
  c.sample.classes = ()  # --mode=sample: empty means every class.
  c.sample.per_class = 4
  c.sample.seed = 0
  c.sample.ema = True
  c.sample.batch_size = 64
  c.sample.grid_every_steps = 5000  # a sample grid in DIR/samples during training.
  c.sample.vae_dir = ""  # latents: the diffusers VAE that decodes samples to images.
  c.sample.clip_denoised = 0.0  # > 0: clip x0 estimates to [-c, c] (pixel space: 1.0).

  c.eval.judge_dir = ""  # a classification workdir whose classifier judges the samples.
  c.eval.train_judge = False  # if judge_dir holds no checkpoint: train judge_config there first.
  c.eval.judge_config = ""  # e.g. configs/ascan_t.py:runlocal (used with train_judge).
  c.eval.num_samples = 0  # samples generated per evaluation (0: no sample-based metrics).
  c.eval.inception_path = ""  # FID Inception safetensors (tools.convert_fid_inception) ...
  c.eval.reference_path = ""  # ... and reference statistics .npz: FID, sFID, IS, prec./recall.
  c.eval.real_samples = 1000  # real held-out images for the feature statistics.

  c.optim.peak_lr = 6e-4
  c.optim.init_lr = 0.0
  c.optim.end_lr = 6e-4  # equal to peak_lr: constant after warm-up (the paper gives no decay).
  c.optim.warmup_steps = 1000
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip_norm = 1.0
  c.optim.ema_decay = 0.9999
  c.checkpoint.best_metric = ""
  return c


# Task name -> schema; the task modules themselves live in ascan_jax.tasks.
TASKS = {"classification": classification, "diffusion": diffusion}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the text after ``:`` in ``--config=file.py:arg``.

  ``arg`` is comma-separated ``key=value`` pairs or bare flags (``runlocal`` means
  ``runlocal=True``); only keys given in ``defaults`` are accepted, each value is converted to the
  type of its default. ``parse_arg('runlocal', runlocal=False)`` -> ``{'runlocal': True}``.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)} "
                       f"(from ':{arg}')")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value.strip())
  return out
