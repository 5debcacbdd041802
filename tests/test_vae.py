"""The flax AutoencoderKL without torch: make_random_vae -> from_pretrained round trips, shapes,
jit, latent scaling, compute dtypes, and the error messages of loading."""
import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ascan_jax.models import vae
from ascan_jax.tools import make_random_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = vae.VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                      layers_per_block=1, norm_num_groups=8, latent_channels=4, shift_factor=0.25)
# One jitted function per (model, shapes) for the whole module (the model is hashable). Tests reuse
# SMALL and one image shape so that compiled programs are shared (and cached across runs).
_encode = jax.jit(vae.encode, static_argnums=0)
_decode = jax.jit(vae.decode, static_argnums=0)
IMAGES = (2, 32, 48, 3)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("vae"))
  make_random_vae.make_random_vae(out, SMALL, seed=0)
  return out


@pytest.fixture(scope="module")
def loaded(vae_dir):
  return vae.from_pretrained(vae_dir)


def _copy(src, dst, config=None, tensors=None):
  """A copy of a VAE directory with (optionally) a new config dict and new tensors."""
  os.makedirs(dst, exist_ok=True)
  if config is None:
    shutil.copy(os.path.join(src, vae.CONFIG_NAME), dst)
  else:
    with open(os.path.join(dst, vae.CONFIG_NAME), "w") as f:
      json.dump(config, f)
  if tensors is None:
    shutil.copy(os.path.join(src, vae.WEIGHTS_NAME), dst)
  else:
    safetensors.numpy.save_file(tensors, os.path.join(dst, vae.WEIGHTS_NAME))
  return dst


def _tensors(vae_dir):
  return safetensors.numpy.load_file(os.path.join(vae_dir, vae.WEIGHTS_NAME))


def test_round_trip_shapes_and_jit(loaded):
  model, params = loaded
  assert model.config == SMALL and model.dtype == jnp.float32
  images = jax.random.uniform(jax.random.key(1), IMAGES, minval=-1.0, maxval=1.0)
  mean, std = _encode(model, params, images)
  f = 2 ** (len(SMALL.block_out_channels) - 1)
  assert SMALL.downsample_factor == f == 2
  assert mean.shape == std.shape == (2, 32 // f, 48 // f, 4)
  assert mean.dtype == std.dtype == jnp.float32
  assert bool(jnp.all(std > 0)) and bool(jnp.all(jnp.isfinite(mean)))
  z = vae.sample_latents(mean, std, jax.random.key(2))
  np.testing.assert_array_equal(z, vae.sample_latents(mean, std, jax.random.key(2)))
  assert not np.allclose(z, mean)
  out = _decode(model, params, z)
  assert out.shape == images.shape and out.dtype == jnp.float32
  # The functools.partial form and the module's own __call__ agree.
  mean2, _ = jax.jit(functools.partial(vae.encode, model))({"params": params}, images)
  np.testing.assert_allclose(mean2, mean, atol=1e-6)
  recon = jax.jit(model.apply)({"params": params}, images)
  np.testing.assert_allclose(recon, _decode(model, params, mean), atol=1e-5)


def test_model_latent_scaling():
  z = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  x = vae.to_model_latents(z, SMALL)
  np.testing.assert_allclose(x, (z - 0.25) * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(vae.from_model_latents(x, SMALL), z, atol=1e-5)
  no_shift = vae.VAEConfig(scaling_factor=0.13025)
  np.testing.assert_allclose(vae.to_model_latents(z, no_shift), z * 0.13025, rtol=1e-6)
  per_channel = vae.VAEConfig(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0),
                              scaling_factor=0.5)
  x = vae.to_model_latents(z, per_channel)
  np.testing.assert_allclose(x[..., 1], (z[..., 1] - 0.2) * 0.5 / 2.0, rtol=1e-5)
  np.testing.assert_allclose(vae.from_model_latents(x, per_channel), z, atol=1e-5)
  # The model is accepted in place of its config; jit works.
  model = vae.AutoencoderKL(SMALL)
  np.testing.assert_allclose(jax.jit(lambda z: vae.to_model_latents(z, model))(z),
                             vae.to_model_latents(z, SMALL))


def test_saved_tensors_round_trip_exactly(vae_dir, loaded):
  _, params = loaded
  tensors = _tensors(vae_dir)
  ours = vae.state_dict_from_params(params)
  assert sorted(ours) == sorted(tensors)
  for name, value in tensors.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  # Torch layouts and diffusers names.
  assert tensors["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
  assert tensors["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (32, 32, 3, 3)
  assert tensors["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape == (32, 64, 1, 1)
  assert tensors["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
  assert tensors["quant_conv.weight"].shape == (8, 8, 1, 1)


def test_params_are_plain_float32_and_kernels_have_logical_axes(loaded):
  model, params = loaded
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
  spec = nn.get_partition_spec(boxed)["params"]
  assert tuple(spec["encoder"]["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(spec["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"]) == (
      "conv_in", "conv_out")


def test_old_style_attention_names_load(vae_dir, loaded, tmp_path):
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  tensors = {}
  for name, value in _tensors(vae_dir).items():
    for new, previous in old.items():
      name = name.replace(f".attentions.0.{new}.", f".attentions.0.{previous}.")
    tensors[name] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in tensors
  # Very old files store the projections as 1x1 convolutions; accepted too.
  name = "decoder.mid_block.attentions.0.query.weight"
  tensors[name] = tensors[name][:, :, None, None]
  _, params = vae.from_pretrained(_copy(vae_dir, str(tmp_path), tensors=tensors))
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_mid_block_without_attention_and_without_quant_convs(tmp_path):
  config = vae.VAEConfig(block_out_channels=(16, 16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
                         latent_channels=16, in_channels=1, out_channels=2, layers_per_block=2,
                         use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False)
  # Random parameters from numpy (flax's init is covered elsewhere and costs compile time).
  rng = np.random.default_rng(3)
  shapes = vae.param_shapes(vae.AutoencoderKL(config))
  vae.save_pretrained(str(tmp_path), config, jax.tree.map(
      lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes))
  names = set(_tensors(str(tmp_path)))
  assert not any("attentions" in n or "quant_conv" in n for n in names)
  model, params = vae.from_pretrained(str(tmp_path))
  mean, std = _encode(model, params, jnp.zeros((1, 16, 16, 1)))
  assert mean.shape == std.shape == (1, 4, 4, 16)
  out = _decode(model, params, mean)
  assert out.shape == (1, 16, 16, 2)


def test_compute_dtypes(vae_dir, loaded):
  model, params = loaded
  images = jax.random.uniform(jax.random.key(1), IMAGES, minval=-1.0, maxval=1.0)
  bf16_model, bf16_params = vae.from_pretrained(vae_dir, dtype=jnp.bfloat16)
  assert bf16_model.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))
  mean32, _ = _encode(model, params, images)
  mean16, std16 = _encode(bf16_model, bf16_params, images)
  assert mean16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(std16)))
  assert float(jnp.max(jnp.abs(mean16 - mean32))) < 0.1 * float(jnp.max(jnp.abs(mean32))) + 0.05
  # force_upcast (true here, as for the SD/SDXL VAEs) turns float16 compute into float32.
  fp16_model, _ = vae.from_pretrained(vae_dir, dtype=jnp.float16)
  assert fp16_model.dtype == jnp.float32


def test_cli_writes_a_loadable_vae(tmp_path, vae_dir):
  # SMALL's architecture (the init program is then compiled once for this module, and cached),
  # with the flags that do not change it set to non-defaults.
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "ascan_jax.tools.make_random_vae", f"--out={out}",
       "--latent_channels=4", "--block_out_channels=32,64", "--layers_per_block=1",
       "--norm_num_groups=8", "--seed=1", "--shift_factor=0.5", "--scaling_factor=0.25"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
  assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 1
  assert config["shift_factor"] == 0.5 and config["scaling_factor"] == 0.25
  model, params = vae.from_pretrained(str(out))
  assert params["encoder"]["conv_out"]["kernel"].shape == (3, 3, 64, 8)
  assert model.config.norm_num_groups == 8
  # The seed is used: other weights than the fixture's (seed 0).
  kernel = _tensors(str(out))["encoder.conv_in.weight"]
  assert kernel.shape == (32, 3, 3, 3) and np.std(kernel) > 0
  assert not np.array_equal(kernel, _tensors(vae_dir)["encoder.conv_in.weight"])


def test_missing_config_or_weights_name_the_path(vae_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json") as e:
    vae.from_pretrained(str(tmp_path))
  assert str(tmp_path) in str(e.value)
  shutil.copy(os.path.join(vae_dir, vae.CONFIG_NAME), tmp_path)
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as e:
    vae.from_pretrained(str(tmp_path))
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vae.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_tensors_are_all_listed(vae_dir, tmp_path):
  tensors = _tensors(vae_dir)
  del tensors["decoder.conv_out.bias"]
  del tensors["encoder.mid_block.attentions.0.to_k.weight"]
  with pytest.raises(ValueError) as e:
    vae.from_pretrained(_copy(vae_dir, str(tmp_path), tensors=tensors))
  message = str(e.value)
  assert "2 missing tensors" in message
  assert "decoder.conv_out.bias (3,)" in message
  assert "encoder.mid_block.attentions.0.to_k.weight (64, 64)" in message
  assert os.path.join(str(tmp_path), vae.WEIGHTS_NAME) in message


def test_wrong_shapes_and_unexpected_tensors_are_all_listed(vae_dir, tmp_path):
  tensors = _tensors(vae_dir)
  tensors["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  tensors["decoder.conv_in.bias"] = np.zeros((63,), np.float32)
  tensors["encoder.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError) as e:
    vae.from_pretrained(_copy(vae_dir, str(tmp_path), tensors=tensors))
  message = str(e.value)
  assert "2 tensors with the wrong shape" in message
  assert "encoder.conv_in.weight: expected (32, 3, 3, 3), found (32, 3, 5, 5)" in message
  assert "decoder.conv_in.bias: expected (64,), found (63,)" in message
  assert "1 unexpected tensors" in message and "encoder.extra.weight (2, 2)" in message
  assert "missing" not in message


def test_weights_of_another_config_are_reported(vae_dir, tmp_path):
  with open(os.path.join(vae_dir, vae.CONFIG_NAME)) as f:
    config = json.load(f)
  config["latent_channels"] = 8
  with pytest.raises(ValueError, match=r"quant_conv.weight: expected \(16, 16, 1, 1\), found "
                                       r"\(8, 8, 1, 1\)"):
    vae.from_pretrained(_copy(vae_dir, str(tmp_path), config=config))


@pytest.mark.parametrize("change, words", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     ["down_block_types", "AttnDownEncoderBlock2D"]),
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
     ["up_block_types", "AttnUpDecoderBlock2D"]),
    ({"act_fn": "tanh"}, ["act_fn", "tanh"]),
    ({"norm_type": "spatial"}, ["unsupported AutoencoderKL config keys", "norm_type"]),
    ({"_class_name": "AutoencoderTiny"}, ["AutoencoderTiny"]),
    ({"block_out_channels": [32, 64, 64]}, ["same length"]),
    ({"norm_num_groups": 12}, ["norm_num_groups=12"]),
])
def test_unsupported_configs_raise_naming_the_option(vae_dir, tmp_path, change, words):
  with open(os.path.join(vae_dir, vae.CONFIG_NAME)) as f:
    config = json.load(f)
  config.update(change)
  with pytest.raises(ValueError) as e:
    vae.from_pretrained(_copy(vae_dir, str(tmp_path), config=config))
  for word in words:
    assert word in str(e.value)
  assert os.path.join(str(tmp_path), vae.CONFIG_NAME) in str(e.value)
