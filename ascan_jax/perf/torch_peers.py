"""The PyTorch side of the accelerator report: timm's models that AsCAN is compared against.

The paper measured throughput with timm's benchmark utility, ``torch.compile``, fp16, batch
1/16/64 at 224x224 (arXiv 2411.04967, Table 7 caption). ``PeerModel`` does the same with the
report's settings: ``timm.create_model(arch, pretrained=False)`` (random weights: speed does not
depend on them), eval mode, channels-last, inputs drawn once on the device, ``torch.inference_mode``,
bf16 autocast on accelerators (float32 on a CPU, like the JAX side there) and, where it can run,
``torch.compile`` (default mode, static shapes: one compilation per batch size, timed
separately). A compilation that fails is reported with its error and the row falls back to
eager; ``compile="auto"`` compiles on CUDA only (on a CPU inductor's C++ build takes minutes per
model and batch). MACs per image come from ``torch.utils.flop_counter.FlopCounterMode`` on one
image (FLOPs / 2).

torch is imported only when a peer is built (``load``), so the rest of the package never needs
it. Its torchvision import (timm imports torchvision) fails on CPU-only torch builds with a
CUDA torchvision wheel (``operator torchvision::nms does not exist``); as in
``tests/torch_reference.py``, the two missing operator schemas are then defined so the
pure-Python parts import.
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import Callable

# Report name -> timm architecture (MaxViT-T and CoAtNet-0 as in ../shared/reference/lessons.md's
# timm benchmark rows).
PEERS = {
    "MaxViT-T": "maxvit_tiny_tf_224",
    "ConvNeXt-T": "convnext_tiny",
    "Swin-T": "swin_tiny_patch4_window7_224",
    "CoAtNet-0": "coatnet_0_rw_224",
}
COMPILE_MODES = ("auto", "on", "off")
_SCHEMAS = None  # kept alive: dropping the Library unregisters the schemas.


class PeersUnavailable(RuntimeError):
  """torch or timm cannot be used here (the message says why)."""


def _make_torchvision_importable(torch) -> None:
  global _SCHEMAS
  try:
    importlib.import_module("torchvision")
    return
  except ImportError:
    return
  except RuntimeError as e:
    if "torchvision::nms" not in str(e) or _SCHEMAS is not None:
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  _SCHEMAS = torch.library.Library("torchvision", "DEF")
  _SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  importlib.import_module("torchvision")


def load():
  """``(torch, timm)``, or ``PeersUnavailable`` naming what is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PeersUnavailable(f"PyTorch is not installed ({e})") from None
  except Exception as e:  # pylint: disable=broad-except  (a broken install: CUDA libraries...)
    raise PeersUnavailable(f"PyTorch cannot be imported ({type(e).__name__}: {e})") from None
  try:
    _make_torchvision_importable(torch)
    import timm  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    raise PeersUnavailable(f"timm cannot be imported ({type(e).__name__}: {e})") from None
  return torch, timm


def versions() -> dict:
  try:
    torch, timm = load()
  except PeersUnavailable as e:
    return {"available": False, "reason": str(e)}
  return {"available": True, "torch": torch.__version__, "timm": timm.__version__,
          "cuda": torch.cuda.is_available()}


def torch_device(platform: str) -> str:
  """The torch device matching the JAX platform, or ``PeersUnavailable``."""
  torch, _ = load()
  if platform == "gpu":
    if not torch.cuda.is_available():
      raise PeersUnavailable("JAX runs on a GPU but this PyTorch build sees no CUDA device")
    return "cuda"
  if platform == "cpu":
    return "cpu"
  raise PeersUnavailable(f"PyTorch has no device for JAX's platform {platform!r} here")


class PeerModel:
  """One timm model on one device; ``measure(batch, ...)`` times its forward at that batch."""

  def __init__(self, name: str, *, platform: str, low_precision: bool, image_size: int = 224,
               compile_mode: str = "auto"):
    if name not in PEERS:
      raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    if compile_mode not in COMPILE_MODES:
      raise ValueError(f"compile mode {compile_mode!r} is not one of {COMPILE_MODES}")
    torch, timm = load()
    self.torch = torch
    self.name, self.arch = name, PEERS[name]
    self.device = torch_device(platform)
    self.image_size = image_size
    self.low_precision = low_precision
    try:  # window-based models (MaxViT, Swin, CoAtNet) size their windows from img_size.
      model = timm.create_model(self.arch, pretrained=False, img_size=image_size)
    except TypeError:  # convolutional ones (ConvNeXt) take any size and no img_size.
      model = timm.create_model(self.arch, pretrained=False)
    model = model.eval()
    self.params = sum(p.numel() for p in model.parameters())
    self.eager = model.to(self.device, memory_format=torch.channels_last)
    self.compile_mode = compile_mode
    want = compile_mode == "on" or (compile_mode == "auto" and self.device == "cuda")
    self.compile_reason = "" if want else (
        "off (--peer_compile=off)" if compile_mode == "off" else
        "not on a CPU (inductor's C++ build takes minutes per model and batch there)")
    self.compiled = torch.compile(self.eager, dynamic=False) if want else None

  def _autocast(self):
    torch = self.torch
    if self.low_precision:
      return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
    return torch.autocast(device_type=self.device, enabled=False)

  def _input(self, batch: int):
    torch = self.torch
    x = torch.randn(batch, 3, self.image_size, self.image_size, device=self.device)
    return x.contiguous(memory_format=torch.channels_last)

  def macs_per_image(self) -> float:
    """Multiply-accumulates of one image's forward (FlopCounterMode, eager)."""
    torch = self.torch
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    with torch.inference_mode(), self._autocast(), FlopCounterMode(display=False) as counter:
      self.eager(self._input(1))
    return counter.get_total_flops() / 2.0

  def _sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def measure(self, batch: int, time_call: Callable, *, warmup: int, repeats: int,
              min_seconds: float) -> dict:
    """``time_call``'s seconds per forward at ``batch`` (``modes.bench.time_call``'s signature)
    plus ``compiled``, ``compile_seconds`` and, after a failed compilation, ``compile_error``."""
    torch = self.torch
    x = self._input(batch)
    out = {"compiled": False, "compile_seconds": None}
    model = self.eager
    with torch.inference_mode(), self._autocast():
      if self.compiled is not None:
        try:
          t0 = time.perf_counter()
          self.compiled(x)
          self._sync()
          out.update(compiled=True, compile_seconds=time.perf_counter() - t0)
          model = self.compiled
        except Exception as e:  # pylint: disable=broad-except
          out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      else:
        out["compile_error"] = self.compile_reason

      def call():
        model(x)
        self._sync()

      times = time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds)
    out["times"] = times
    return out

  def close(self):
    """Frees the model's device memory (the JAX side shares the accelerator)."""
    self.compiled = None
    self.eager = None
    if self.device == "cuda":
      self.torch.cuda.empty_cache()
