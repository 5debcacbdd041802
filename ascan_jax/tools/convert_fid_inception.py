"""One-time conversion of pytorch-fid's FID Inception weights (a torch pickle) to safetensors.

    python -m ascan_jax.tools.convert_fid_inception \
        --input=pt_inception-2015-12-05-6726825d.pth --output=fid_inception.safetensors

The input is the state dict of torchvision's ``Inception3`` patched by pytorch-fid (keys such
as ``Mixed_6d.branch1x1.conv.weight``, ``Mixed_6d.branch1x1.bn.running_var``, ``fc.weight``).
Only this tool imports torch (``torch.load(weights_only=True)``); the runtime reads the
safetensors file written here with ``ascan_jax.models.inception.load_params`` and never
unpickles anything. The output holds flax-layout float32 tensors named ``params/<module>/...``
and ``batch_stats/<module>/...`` (conv kernels OIHW -> HWIO, the fc weight transposed) and
records the input's sha256 in its metadata. Both files' sha256 are printed so they can be
recorded next to results. If the input's name carries torch-hub's hash suffix
(``-6726825d.pth``), the sha256 must start with it.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

import numpy as np
from absl import app
from absl import flags

from ascan_jax.eval.generative_metrics import file_sha256
from ascan_jax.models import inception

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu().numpy()
  return np.asarray(v)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid Inception3 state dict (torch tensors or arrays) -> flat flax float32 tensors.

  Raises ``ValueError`` listing every key that cannot be mapped and every missing or wrongly
  shaped tensor (checked against ``inception.expected_shapes()``).
  """
  out: dict[str, np.ndarray] = {}
  unmapped = []
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[-1] in _IGNORED_SUFFIXES:
      continue
    arr = _to_numpy(value).astype(np.float32)
    module, kind, name = "/".join(parts[:-2]), parts[-2] if len(parts) >= 2 else "", parts[-1]
    if parts[:-1] == ["fc"] and name in ("weight", "bias"):
      out["params/fc/kernel" if name == "weight" else "params/fc/bias"] = (
          arr.T if name == "weight" else arr)
    elif kind == "conv" and name == "weight" and module and arr.ndim == 4:
      out[f"params/{module}/conv/kernel"] = np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO
    elif kind == "bn" and name in _BN and module:
      collection, leaf = _BN[name]
      out[f"{collection}/{module}/bn/{leaf}"] = arr
    else:
      unmapped.append(key)
  problems = []
  if unmapped:
    problems.append(f"  torch keys with no FID Inception counterpart ({len(unmapped)}): "
                    + ", ".join(sorted(unmapped)))
  try:
    inception.check_flat_params(out, source="converted tensors")
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError("cannot convert this state dict to the FID Inception-v3:\n"
                     + "\n".join(problems))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def load_torch_state_dict(path: str) -> dict[str, Any]:
  """Reads a ``.pth`` state dict with torch (tensors only: ``weights_only=True``)."""
  import torch  # pylint: disable=import-outside-toplevel

  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(obj)}")
  return dict(obj)


def check_hub_hash(path: str, sha256: str) -> None:
  """torch-hub convention: ``name-<hex prefix of the sha256>.pth``."""
  m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", os.path.basename(path))
  if m and not sha256.startswith(m.group(1)):
    raise ValueError(f"{path}: sha256 {sha256} does not start with the hash in its name "
                     f"({m.group(1)}); the file is corrupt or not the one it claims to be")


def convert_file(input_path: str, output_path: str, check_hash: bool = True) -> tuple[str, str]:
  """Converts ``input_path`` (.pth) to ``output_path`` (.safetensors); returns both sha256."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  in_sha = file_sha256(input_path)
  if check_hash:
    check_hub_hash(input_path, in_sha)
  flat = convert_state_dict(load_torch_state_dict(input_path))
  out_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(out_dir, exist_ok=True)
  tmp = output_path + ".tmp"
  save_file(flat, tmp, metadata={"format": inception.SAFETENSORS_FORMAT,
                                 "source": os.path.basename(input_path),
                                 "source_sha256": in_sha})
  os.replace(tmp, output_path)
  return in_sha, file_sha256(output_path)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("input", None, "pytorch-fid weights, pt_inception-2015-12-05-6726825d.pth")
  flags.DEFINE_string("output", None, "where to write the safetensors file")
  flags.DEFINE_bool("check_hash", True, "check the sha256 against a hash suffix in --input's name")
  flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  in_sha, out_sha = convert_file(FLAGS.input, FLAGS.output, check_hash=FLAGS.check_hash)
  print(f"input  {FLAGS.input}\n  sha256 {in_sha}")
  print(f"output {FLAGS.output}\n  sha256 {out_sha}")
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
