"""Conditioning inputs of the diffusion UNet: timestep embedding and class-label context.

* ``timestep_sinusoids(t, dim)``: the DDPM / SD sinusoidal embedding of float timesteps
  ``t`` in ``[0, 1000)``: ``[cos(t f_i), sin(t f_i)]`` with ``f_i = 10000**(-i / (dim/2))``.
* ``TimestepEmbedding``: sinusoids, then two linear layers with a SiLU between them (AsCAN
  arXiv 2411.04967 sec. A.6: "sinusoidal, then two linear layers", SDXL style). The UNet adds
  the result inside every C block (``blocks.ConvBlock``'s ``emb`` input).
* ``ClassConditioner``: class labels ``[B]`` -> a context ``[B, n_tokens, context_dim]`` from a
  learned table, so the UNet only ever sees a context (AsCAN conditions on classes through
  cross-attention; the class-embedding form is not given, a learned token per class is the
  simplest). Index ``num_classes`` is the "null" class of classifier-free guidance: training
  swaps it in at the condition-drop rate, sampling uses it for the unconditional pass. The table
  is initialised with unit variance per feature (like the normalised output of a text encoder).

A text context (T5 embeddings, optionally through a text adapter) goes into the UNet directly,
with its padding mask.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import blocks

MAX_PERIOD = 10000.0


def timestep_sinusoids(t: jax.Array, dim: int, max_period: float = MAX_PERIOD) -> jax.Array:
  """``[B, dim]`` float32 sinusoidal embedding of timesteps ``t`` ``[B]`` (``dim`` even)."""
  if dim % 2:
    raise ValueError(f"timestep embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
  """``t`` ``[B]`` -> ``[B, features]``: sinusoids (``frequency_dim``), Dense, SiLU, Dense."""
  features: int
  frequency_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    e = timestep_sinusoids(t, self.frequency_dim).astype(self.dtype)
    e = blocks.dense(self.features, (None, "embed"), dtype=self.dtype, name="linear1")(e)
    e = blocks.dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="linear2")(
        nn.silu(e))
    return e


class ClassConditioner(nn.Module):
  """Class labels ``[B]`` (int, ``num_classes`` = null) -> context ``[B, n_tokens, context_dim]``.

  Output is float32 (the UNet casts it to its compute dtype). The table is replicated (logical
  axes ``(None, None)``): it is small (1001 x 768 floats for ImageNet), and sharding it made the
  batch-sharded row gather fall back to full rematerialisation in the SPMD partitioner.
  """
  num_classes: int
  context_dim: int
  n_tokens: int = 1

  @property
  def null_label(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
        (self.num_classes + 1, self.n_tokens * self.context_dim), jnp.float32)
    ctx = jnp.take(table, labels.astype(jnp.int32), axis=0)
    return ctx.reshape(labels.shape[0], self.n_tokens, self.context_dim)
