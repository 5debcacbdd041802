"""Peak dense matmul throughput per device, the denominator of model FLOP utilisation (MFU).

Accelerator numbers are the vendors' published dense (no sparsity) peaks per chip:
Google Cloud TPU system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918 bf16 TFLOP/s) and
NVIDIA data sheets (A100 312 bf16 / 156 TF32; H100 SXM 989 / 495, H100 PCIe 756 / 378;
H200 989 / 495). float32 on NVIDIA GPUs is counted against the TF32 peak (XLA's default for
f32 matmuls there); on TPU both dtypes are counted against the bf16 peak. On a CPU the peak is
measured: the median of timed float32 (or bfloat16) 2048x2048 matmuls.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# (substring of device_kind, lower case) -> (bf16 TFLOP/s, f32 TFLOP/s). First match wins.
PEAK_TFLOPS = (
    ("tpu v6 lite", (918.0, 918.0)),
    ("tpu v6e", (918.0, 918.0)),
    ("tpu v5 lite", (197.0, 197.0)),
    ("tpu v5e", (197.0, 197.0)),
    ("tpu v5p", (459.0, 459.0)),
    ("tpu v5", (459.0, 459.0)),
    ("tpu v4", (275.0, 275.0)),
    ("h200", (989.0, 495.0)),
    ("h100 pcie", (756.0, 378.0)),
    ("h100", (989.0, 495.0)),
    ("a100", (312.0, 156.0)),
)


def table_peak_flops(device_kind: str, dtype) -> float | None:
  kind = device_kind.lower()
  for key, (bf16, f32) in PEAK_TFLOPS:
    if key in kind:
      low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      return (bf16 if low else f32) * 1e12
  return None


def measure_matmul_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 10,
                         device=None) -> float:
  """Median achieved FLOP/s of an n x n matmul on ``device``."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / statistics.median(times)


def peak_flops(device, dtype) -> tuple[float, str]:
  """(peak FLOP/s, where the number comes from) for one device."""
  peak = table_peak_flops(device.device_kind, dtype)
  if peak is not None:
    return peak, f"vendor peak for {device.device_kind}"
  measured = measure_matmul_flops(dtype, device=device)
  return measured, f"measured {jnp.dtype(dtype).name} 2048x2048 matmul on {device.device_kind}"
