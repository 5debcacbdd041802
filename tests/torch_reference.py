"""The optional PyTorch reference stack of the parity tests: import it, or skip the test module.

torchvision's PyPI wheel is a CUDA build; on CPU torch its C++ ops are missing and
``import torchvision`` fails on ``torchvision::nms`` (and so do diffusers/transformers model
imports and pytorch-fid, which import it). Defining the two operator schemas it looks up makes its
pure-Python parts importable. Done once per process, and only when the plain import fails.
"""
import importlib
import sys

import pytest

_TORCHVISION_SCHEMAS = None  # kept alive: dropping the Library unregisters the schemas.


def _make_torchvision_importable(torch) -> None:
  global _TORCHVISION_SCHEMAS
  try:
    importlib.import_module("torchvision")
    return
  except ImportError:
    return  # not installed: nothing to fix (tests that need it skip themselves).
  except RuntimeError as e:
    if "torchvision::nms" not in str(e) or _TORCHVISION_SCHEMAS is not None:
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
  _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  importlib.import_module("torchvision")


def import_torch():
  """``torch`` with torchvision made importable; skips the calling module without torch."""
  torch = pytest.importorskip("torch")
  _make_torchvision_importable(torch)
  return torch
