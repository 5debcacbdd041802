"""The class-conditional ImageNet diffusion recipe (arXiv 2411.04967, section A.7) and its
``runlocal`` shrink, shared by ``imagenet{256,512}_diffusion.py``.

Paper: the asymmetric UNet with channels {160, 320, 640} and cross-attention width 768 (about
400M parameters), DDPM epsilon prediction with the scaled-linear schedule over 1000 steps (final
beta 0.01 at 256, 0.02 at 512), AdamW lr 6e-4, weight decay 0.01, betas (0.9, 0.99), batch 2048,
1000 epochs, Heun 30 steps, guidance 1.78 (or the ramp 1.1 -> 3.6 on steps 5..30). Not given,
our choices: 1000 warm-up steps then a constant learning rate, EMA 0.9999, gradient clipping 1.0,
label dropout 0.1, and the 4-channel SD VAE (the paper's "8-channel VAE" is not identified; any
diffusers AutoencoderKL works: the latent shape comes from the cache).

``:runlocal`` trains in pixel space on the embedded MNIST digits (32x32, grey) with a small UNet
on a CPU; a classifier trained by the classification task on the same digits (cached under
``$ASCAN_CACHE``, default ``~/.cache/ascan_jax``, trained first if missing) judges the samples.
"""
import os

from ascan_jax import config_defaults
from ascan_jax.models import unet_variants
from ascan_jax.tasks import diffusion


def _cache_dir(*parts):
  base = os.environ.get("ASCAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "ascan_jax")
  return os.path.join(base, *parts)


def get_config(resolution: int, arg=None):
  args = config_defaults.parse_arg(arg, runlocal=False)
  c = diffusion.default_config()
  v = unet_variants.VARIANTS["imagenet"]
  c.model.channels = tuple(v["channels"])
  c.model.down_layout = v["down_layout"]
  c.model.mid_layout = v["mid_layout"]
  c.model.head_dim = v["head_dim"]
  c.model.context_dim = v["context_dim"]
  c.data.name = "imagenet2012"
  c.data.image_size = resolution
  c.data.latent_dir = f"latents/imagenet{resolution}"
  # Cached latents cost about 0.15 ms (256²) / 0.5 ms (512²) of CPU per example (msgpack,
  # float16 -> float32, one noise draw; measured with ascan_jax.data.latents on a 2-core Xeon),
  # so two worker processes supply about 13,000 (4,000) examples/s, off the training process's
  # GIL: more than a 4-chip or 8-GPU host trains this UNet at. Training in pixel space on JPEGs
  # (data.latent_dir='') needs the classification configs' counts instead (README, "Input
  # pipeline throughput").
  c.data.worker_count = 2
  c.diffusion.beta_end = 0.01 if resolution < 512 else 0.02
  c.batch_size = 2048
  c.total_epochs = 1000.0
  c.sample.sampler = "heun"
  c.sample.steps = 30
  c.sample.guidance = "constant"
  c.sample.scale = 1.78
  c.evals.val.every_steps = 10000
  c.evals.samples.every_steps = 10000
  c.evals.grid.every_steps = 5000
  c.checkpoint.every_steps = 2000
  if args.runlocal:
    _runlocal(c)
  return c


def _runlocal(c):
  """Pixel-space MNIST digits on a 2-core CPU (see the README for the measured run)."""
  c.model.channels = (32, 64, 128)
  c.model.down_layout = "C-CT-CT"
  c.model.mid_layout = "CT"
  c.model.head_dim = 32
  c.model.context_dim = 64
  c.model.norm_groups = 8
  c.model.dtype = "float32"
  c.data.name = "embedded_mnist"
  c.data.latent_dir = ""
  c.data.worker_count = 0  # 28x28 digits from memory: decoding in the main process is enough.
  c.data.eval_resize_small_squares = True  # 28x28 digits are resized to 32, not cropped.
  c.data.image_size = 32
  c.data.channels = 1
  c.data.patch = 2  # the UNet sees 16x16x4.
  c.data.num_classes = 10
  c.data.flip = False  # mirrored digits are other digits.
  c.data.eval_crop_fraction = 0.875
  c.diffusion.beta_end = 0.02  # pixel space: a lower terminal signal-to-noise ratio.
  c.batch_size = 64
  c.eval_batch_size = 200
  c.total_epochs = 0.0
  c.total_steps = 3000
  c.optim.schedule = "cosine"
  c.optim.peak_lr = 1e-3
  c.optim.end_lr = 1e-5
  c.optim.warmup_steps = 200
  c.optim.ema_decay = 0.999
  c.optim.ema_warmup = True
  c.log.every_steps = 50
  c.evals.val.every_steps = 3000
  c.checkpoint.every_steps = 500
  c.sample.guidance = "constant"
  c.sample.scale = 3.0  # measured: judged accuracy 0.62 / 0.87 / 0.94 at scales 1 / 2 / 3.
  c.sample.batch_size = 250
  c.sample.clip_denoised = 1.0  # pixel space.
  c.sample.per_class = 10
  c.evals.grid.every_steps = 1000
  e = c.evals.samples
  e.every_steps = 3000
  e.num_samples = 1000
  e.real_samples = 1000
  e.judge_dir = _cache_dir("judges", "embedded_mnist32_ascan_t_runlocal")
  e.train_judge = True
  e.judge_config = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "ascan_t.py:runlocal")
