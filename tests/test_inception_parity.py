"""Parity of the flax FID Inception-v3 with pytorch-fid's (random weights, offline).

pytorch-fid's ``fid_inception_v3`` always downloads the real weights, so it is replaced by a
builder that makes the same patched torchvision Inception3 with random weights (BatchNorm
statistics calibrated on random images so activations stay O(1) through the ~95 layers and
the comparison is meaningful). Its state dict goes through ``torch.save`` -> the converter
-> safetensors -> ``load_params``, and the pool features, logits and sFID spatial features
are compared on 2 images at 64x64 (resized) and 1 at 299x299.
"""
import copy

import jax
import numpy as np
import pytest

from tests import torch_reference

torch = torch_reference.import_torch()
pytest.importorskip("safetensors")


pfi = pytest.importorskip("pytorch_fid.inception")

from ascan_jax.models import inception  # noqa: E402
from ascan_jax.tools import convert_fid_inception  # noqa: E402

TOL = 1e-4


def _random_fid_inception():
  """pytorch-fid's ``fid_inception_v3`` structure, random weights, no state dict loaded."""
  # pylint: disable-next=protected-access
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  return net


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
  torch.manual_seed(0)
  built = []

  def builder():
    built.append(_random_fid_inception())
    return built[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "fid_inception_v3", builder)
    model = pfi.InceptionV3([3])  # use_fid_inception=True, resize + normalise on.
  net = built[0]
  with torch.no_grad():
    for conv in [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]:
      torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # unit-scale activations
    for bn in [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
      # A positive shift keeps most ReLUs open: with zero-mean shifts this random net is
      # chaotic and amplifies float32 rounding ~1.6x per block (pytorch-fid's own float32
      # output then differs from its float64 output by ~2e-4), which would test noise.
      bn.weight.uniform_(0.5, 1.0)
      bn.bias.normal_(0.5, 0.1)
      bn.reset_running_stats()
      bn.momentum = None  # cumulative average over the calibration pass.
    model.train()
    # One batch with both kinds of test input (upsampled 64px noise and 299px noise), so the
    # statistics cover both and activations stay O(1) for either.
    gen = torch.Generator().manual_seed(1)
    small = torch.nn.functional.interpolate(torch.rand(4, 3, 64, 64, generator=gen),
                                            size=(299, 299), mode="bilinear", align_corners=False)
    model(torch.cat([small, torch.rand(4, 3, 299, 299, generator=gen)]))
    model.eval()
    net.fc.bias.normal_(0.0, 1.0)
  path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
  torch.save(net.state_dict(), path)
  return model, net, path


@pytest.fixture(scope="module")
def flax_variables(torch_model, tmp_path_factory):
  _, _, pth = torch_model
  out = tmp_path_factory.mktemp("converted") / "fid_inception.safetensors"
  in_sha, out_sha = convert_fid_inception.convert_file(str(pth), str(out))
  assert len(in_sha) == len(out_sha) == 64
  return inception.load_params(str(out))


def _torch_outputs(model, net, images_nhwc):
  captured = {}
  hook = net.Mixed_6d.branch1x1.register_forward_hook(
      lambda mod, inp, out: captured.__setitem__("b1", out))
  try:
    with torch.no_grad():
      x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
      pool = model(x)[0].flatten(1)
      logits = net.fc(pool)
      unbiased = pool @ net.fc.weight.T
  finally:
    hook.remove()
  b1 = captured["b1"].permute(0, 2, 3, 1)[..., :7]  # NHWC, ADM's channels [:7]
  return {"pool": pool.numpy(), "logits": logits.numpy(),
          "logits_unbiased": unbiased.numpy(),
          "spatial": b1.reshape(b1.shape[0], -1).numpy()}


def test_flax_matches_pytorch_fid(torch_model, flax_variables):
  model, net, _ = torch_model
  model64 = copy.deepcopy(model).double()  # the exact answer, to put float32 noise in context
  rng = np.random.default_rng(0)
  groups = [rng.random((2, 64, 64, 3), dtype=np.float32),
            rng.random((1, 299, 299, 3), dtype=np.float32)]
  forward = jax.jit(inception.FIDInceptionV3().apply)
  report = []
  for images in groups:
    ours = {k: np.asarray(v) for k, v in forward(flax_variables, images).items()}
    ref = _torch_outputs(model, net, images)
    assert ours["pool"].shape == (len(images), 2048)
    assert ours["spatial"].shape == (len(images), 2023)
    assert ours["logits"].shape == ours["logits_unbiased"].shape == (len(images), 1008)
    for key in ("pool", "spatial", "logits", "logits_unbiased"):
      err = float(np.max(np.abs(ours[key] - ref[key])))
      scale = float(np.max(np.abs(ref[key])))
      report.append(f"{images.shape[1]}px {key}: max abs diff {err:.2e} (max |ref| {scale:.2f})")
      assert scale > 0.1, f"{key}: degenerate reference activations (max {scale})"
      assert err < TOL, report[-1]
    with torch.no_grad():
      exact = model64(torch.from_numpy(images).permute(0, 3, 1, 2).double())[0].flatten(1).numpy()
    ours_err = float(np.max(np.abs(ours["pool"] - exact)))
    torch_err = float(np.max(np.abs(ref["pool"] - exact)))
    report.append(f"{images.shape[1]}px pool vs float64 torch: ours {ours_err:.2e}, "
                  f"pytorch-fid float32 {torch_err:.2e}")
    assert ours_err < max(2 * torch_err, TOL), report[-1]
  print("\n" + "\n".join(report))


def test_converter_and_loader_report_all_problems(torch_model, tmp_path):
  from safetensors.numpy import save_file

  _, net, _ = torch_model
  sd = {k: v for k, v in net.state_dict().items()}
  flat = convert_fid_inception.convert_state_dict(sd)
  assert set(flat) == set(inception.expected_shapes())
  assert flat["params/Conv2d_1a_3x3/conv/kernel"].shape == (3, 3, 3, 32)

  bad = dict(sd)
  del bad["Mixed_7c.branch_pool.bn.running_var"]
  bad["AuxLogits.fc.weight"] = torch.zeros(3)
  bad["fc.bias"] = torch.zeros(1000)
  with pytest.raises(ValueError) as e:
    convert_fid_inception.convert_state_dict(bad)
  msg = str(e.value)
  assert "AuxLogits.fc.weight" in msg
  assert "batch_stats/Mixed_7c/branch_pool/bn/var" in msg
  assert "params/fc/bias: got (1000,), expected (1008,)" in msg

  flat_bad = dict(flat)
  flat_bad.pop("params/Mixed_5b/branch1x1/conv/kernel")
  flat_bad["params/extra/kernel"] = np.zeros(2, np.float32)
  flat_bad["params/fc/kernel"] = np.zeros((2048, 1000), np.float32)
  path = tmp_path / "bad.safetensors"
  save_file(flat_bad, str(path))
  with pytest.raises(ValueError) as e:
    inception.load_params(str(path))
  msg = str(e.value)
  assert "missing (1): params/Mixed_5b/branch1x1/conv/kernel" in msg
  assert "unexpected (1): params/extra/kernel" in msg
  assert "params/fc/kernel: got (2048, 1000), expected (2048, 1008)" in msg


def test_hub_hash_check(tmp_path):
  p = tmp_path / "weights-deadbeef.pth"
  p.write_bytes(b"not the weights")
  with pytest.raises(ValueError, match="does not start with"):
    convert_fid_inception.check_hub_hash(str(p), "0" * 64)
  convert_fid_inception.check_hub_hash(str(p), "deadbeef" + "0" * 56)


@pytest.mark.parametrize("shape", [(64, 64), (299, 299), (512, 300), (1000, 17), (37, 500)])
def test_resize_matches_torch_interpolate(shape):
  """Up- and down-sampling (where antialiasing would matter) against pytorch-fid's resize."""
  images = np.random.default_rng(0).random((2,) + shape + (3,), dtype=np.float32)
  ours = np.asarray(jax.jit(inception.resize_bilinear)(images))
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(ours - theirs)) < 1e-6
