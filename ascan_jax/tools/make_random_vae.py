"""Writes a random-weight AutoencoderKL in diffusers' layout, without torch.

``python -m ascan_jax.tools.make_random_vae --out=DIR [--latent_channels=4
--block_out_channels=32,64 --layers_per_block=1 --norm_num_groups=8 --seed=0]``

DIR gets ``config.json`` and ``diffusion_pytorch_model.safetensors`` (torch names and layouts)
built from the flax initialisers through ``vae.save_pretrained``, so both
``ascan_jax.models.vae.from_pretrained`` and diffusers' ``AutoencoderKL.from_pretrained`` load it.
For tests and CPU demos, where no pretrained VAE can be downloaded; the images it decodes are
noise. Like main.py, it keeps compiled programs in ``$ASCAN_COMPILATION_CACHE`` when that is set.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
import jax

from ascan_jax.models import vae

FLAGS = flags.FLAGS


def _define_flags():
  """Flags exist only when this runs as a program, so importing it never clashes."""
  flags.DEFINE_string("out", None, "Output directory (created if needed).")
  flags.DEFINE_integer("latent_channels", 4, "Latent channels.")
  flags.DEFINE_list("block_out_channels", ["32", "64"], "Widths per level, comma separated.")
  flags.DEFINE_integer("layers_per_block", 1, "ResNet blocks per encoder level (decoder: +1).")
  flags.DEFINE_integer("norm_num_groups", 8, "GroupNorm groups; must divide every width.")
  flags.DEFINE_integer("in_channels", 3, "Image channels in.")
  flags.DEFINE_integer("out_channels", 3, "Image channels out.")
  flags.DEFINE_float("scaling_factor", 0.18215, "config scaling_factor.")
  flags.DEFINE_float("shift_factor", None, "config shift_factor (unset: null).")
  flags.DEFINE_bool("mid_block_add_attention", True, "Self-attention in the mid blocks.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the flax initialisers.")


def make_random_vae(out: str, config: vae.VAEConfig, seed: int = 0) -> None:
  """Initialises ``config`` with flax's initialisers (``seed``) and writes it to ``out``."""
  model = vae.AutoencoderKL(config)
  params = vae.init_params(model, jax.random.key(seed))
  vae.save_pretrained(out, config, params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cache = os.environ.get("ASCAN_COMPILATION_CACHE", "")  # the convention of main.py and tests.
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  n = len(FLAGS.block_out_channels)
  try:
    config = vae.VAEConfig(
        in_channels=FLAGS.in_channels, out_channels=FLAGS.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(int(c) for c in FLAGS.block_out_channels),
        layers_per_block=FLAGS.layers_per_block, latent_channels=FLAGS.latent_channels,
        norm_num_groups=FLAGS.norm_num_groups, scaling_factor=FLAGS.scaling_factor,
        shift_factor=FLAGS.shift_factor, mid_block_add_attention=FLAGS.mid_block_add_attention)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  make_random_vae(FLAGS.out, config, FLAGS.seed)
  print(f"wrote a random AutoencoderKL to {FLAGS.out}: {config.to_dict()}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
