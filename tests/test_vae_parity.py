"""Parity of the flax AutoencoderKL with diffusers' PyTorch AutoencoderKL (float32, CPU).

Random-weight diffusers models are built offline, saved with ``save_pretrained`` and loaded with
``vae.from_pretrained``; the posterior mean and std and the decoded images must agree to 1e-4.
Also: old-style attention names, bfloat16 checkpoints, and diffusers loading what
``make_random_vae`` writes. Skipped when torch or diffusers is not installed.
"""
import os

import jax
import numpy as np
import pytest

from tests import torch_reference

torch = torch_reference.import_torch()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")


pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
import safetensors.numpy  # noqa: E402

from ascan_jax.models import vae  # noqa: E402
from ascan_jax.tools import make_random_vae  # noqa: E402

TOLERANCE = 1e-4
_encode = jax.jit(vae.encode, static_argnums=0)
_decode = jax.jit(vae.decode, static_argnums=0)


def _blocks(n):
  return dict(down_block_types=("DownEncoderBlock2D",) * n,
              up_block_types=("UpDecoderBlock2D",) * n)


SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
             **_blocks(2))
CONFIGS = {  # name: (diffusers kwargs, image batch, height, width)
    "small": (SMALL, (2, 32, 48)),
    "latent8": (dict(SMALL, latent_channels=8), (2, 32, 32)),
    # The Stable Diffusion 1.x / 2.x shape (SDXL's VAE has the same architecture).
    "sd1": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 latent_channels=4, **_blocks(4)), (1, 32, 32)),
    # Options: no quant convs, no mid-block attention, 16 latent channels, odd channel counts.
    "options": (dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4,
                     latent_channels=16, in_channels=1, out_channels=2, use_quant_conv=False,
                     use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1,
                     **_blocks(3)), (1, 16, 24)),
}


def _torch_vae(seed=0, **kwargs):
  torch.manual_seed(seed)
  return TorchAutoencoderKL(**kwargs).eval()


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _max_differences(torch_model, model, params, shape, seed=0):
  """Max abs differences (mean, std, decode) between torch and flax on the same random inputs."""
  rng = np.random.default_rng(seed)
  b, h, w = shape
  images = rng.uniform(-1, 1, (b, torch_model.config.in_channels, h, w)).astype(np.float32)
  f = model.config.downsample_factor
  latents = rng.standard_normal((b, model.config.latent_channels, h // f, w // f))
  latents = latents.astype(np.float32)
  with torch.no_grad():
    posterior = torch_model.encode(torch.from_numpy(images)).latent_dist
    decoded = torch_model.decode(torch.from_numpy(latents)).sample.numpy()
  mean, std = _encode(model, params, images.transpose(0, 2, 3, 1))
  ours = _decode(model, params, latents.transpose(0, 2, 3, 1))
  assert _nchw(mean).shape == tuple(posterior.mean.shape)
  assert _nchw(ours).shape == decoded.shape
  return {"mean": float(np.abs(_nchw(mean) - posterior.mean.numpy()).max()),
          "std": float(np.abs(_nchw(std) - posterior.std.numpy()).max()),
          "decode": float(np.abs(_nchw(ours) - decoded).max())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, tmp_path):
  kwargs, shape = CONFIGS[name]
  torch_model = _torch_vae(**kwargs)
  torch_model.save_pretrained(str(tmp_path))
  model, params = vae.from_pretrained(str(tmp_path))
  assert model.config.block_out_channels == tuple(kwargs["block_out_channels"])
  diffs = _max_differences(torch_model, model, params, shape)
  print(f"parity {name}: {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.fixture(scope="module")
def small_torch(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("small"))
  torch_model = _torch_vae(seed=1, **SMALL)
  torch_model.save_pretrained(path)
  return torch_model, path


def test_old_style_attention_names(small_torch, tmp_path):
  torch_model, path = small_torch
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  tensors = {}
  for key, value in safetensors.numpy.load_file(os.path.join(path, vae.WEIGHTS_NAME)).items():
    for new, old in names.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    tensors[key] = value
  assert "decoder.mid_block.attentions.0.proj_attn.bias" in tensors
  old_dir = str(tmp_path)
  safetensors.numpy.save_file(tensors, os.path.join(old_dir, vae.WEIGHTS_NAME))
  with open(os.path.join(path, vae.CONFIG_NAME)) as src, \
       open(os.path.join(old_dir, vae.CONFIG_NAME), "w") as dst:
    dst.write(src.read())
  model, params = vae.from_pretrained(old_dir)
  # diffusers converts the old names itself: both must agree with the original model.
  reloaded = TorchAutoencoderKL.from_pretrained(old_dir).eval()
  for reference in (torch_model, reloaded):
    diffs = _max_differences(reference, model, params, (2, 32, 48), seed=1)
    print(f"parity old-style names: {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_bfloat16_checkpoint_loads_exactly(small_torch, tmp_path):
  torch_model, _ = small_torch
  torch_model.to(torch.bfloat16).save_pretrained(str(tmp_path))
  torch_model.to(torch.float32)
  _, params = vae.from_pretrained(str(tmp_path))
  ours = vae.state_dict_from_params(params)
  reference = {k: v.to(torch.bfloat16).float().numpy() for k, v in torch_model.state_dict().items()}
  assert sorted(ours) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_diffusers_loads_what_make_random_vae_writes(tmp_path):
  config = vae.VAEConfig(shift_factor=0.5, **SMALL)
  make_random_vae.make_random_vae(str(tmp_path), config, seed=2)
  torch_model = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
  assert tuple(torch_model.config.block_out_channels) == (32, 64)
  assert torch_model.config.shift_factor == 0.5
  model, params = vae.from_pretrained(str(tmp_path))
  diffs = _max_differences(torch_model, model, params, (2, 32, 48), seed=2)
  print(f"parity make_random_vae -> diffusers: {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs
