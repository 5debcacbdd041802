"""Class-conditional ImageNet 256x256 latent diffusion with the AsCAN UNet (paper section 4.2).

Latents: python -m ascan_jax.tools.cache_latents --config=configs/imagenet256_diffusion.py \
             --vae=VAE_DIR --output=latents/imagenet256 --split=train,validation
Train:   python main.py --config=configs/imagenet256_diffusion.py --workdir=DIR \
             --config.data.latent_dir=latents/imagenet256 --config.sample.vae_dir=VAE_DIR
Sample:  python main.py --config=configs/imagenet256_diffusion.py --workdir=DIR --mode=sample ...
Target:  FID 2.23 at 256 (paper, 50K samples; the guidance setting of that number is not given);
         512 not reported. Hardware: many accelerators (batch 2048, 1000 epochs).
Try it:  python main.py --config=configs/imagenet256_diffusion.py:runlocal --workdir=DIR
         (pixel-space MNIST digits on a CPU; see README for the measured result.)
"""
from configs import diffusion_common


def get_config(arg=None):
  return diffusion_common.get_config(256, arg)
