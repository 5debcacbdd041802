"""Backend facts the rest of the code asks about: compute dtype, platform."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(name: str):
  """``auto`` is bfloat16 on GPU/TPU and float32 on CPU (bf16 is not faster on CPU)."""
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
