"""The trainable text adapter between the frozen text encoder and the UNet (AsCAN paper A.6).

Facts (arXiv 2411.04967 §A.6): the frozen Flan-T5-XXL embeddings pass through "two T blocks
with one attention head", at the embedding width (4096), before the UNet's cross-attention reads
them. The paper gives nothing more; the choices, with the reason:

* **Block form**: the AsCAN T block (``models.blocks.TransformerBlock``): one pre-norm
  LayerNorm, attention and an MLP (ratio 4, GELU) in parallel, ``y = x + attn(ln x) +
  mlp(ln x)``, so the adapter is made of the same block the rest of the network uses.
* **Masked self-attention over the text tokens**: keys at padding positions (``mask == 0``) are
  never attended to, so a prompt's adapted embedding does not depend on how much padding follows
  it. The attention is ``attention.MultiHeadCrossAttention`` with the tokens as both queries and
  context (it is the module with a key mask), with query/key RMSNorm as in the UNet's T blocks
  (bf16 stability, paper §3.3.1). No position encoding: T5's output already carries position
  (its relative attention bias).
* Padding positions still get an output (computed from the real tokens); the UNet's
  cross-attention masks them with the same mask.
* One head at width 4096 means one 4096-wide head; ``num_heads`` may be changed.

Call: ``adapter.apply(variables, text [B, L, D], mask [B, L] (1 = token))`` -> ``[B, L, D]`` in
float32. Parameters: ``block{1,2}/{norm, attention/{query,key,value,out,query_norm,key_norm},
mlp_in, mlp_out}`` with logical axis names (``embed``, ``heads``, ``mlp``), so FSDP and tensor
parallelism shard the ~400M parameters at width 4096 like every other layer.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import attention as attention_lib
from ascan_jax.models import blocks

TOKEN_AXES = ("batch", "length", "embed")


class TextBlock(nn.Module):
  """One T block over text tokens ``[B, L, D]`` with a padding ``mask`` ``[B, L]``."""
  num_heads: int = 1
  mlp_ratio: int = 4
  qk_norm: bool = True
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"text width {width} does not split into {self.num_heads} heads")
    xn = blocks.layer_norm(self.dtype, "norm")(x)
    attn = attention_lib.MultiHeadCrossAttention(
        self.num_heads, width // self.num_heads, self.attention_impl, self.dtype,
        qk_norm=self.qk_norm, name="attention")(xn.reshape(b, 1, length, width), xn, mask)
    mlp = blocks.dense(width * self.mlp_ratio, ("embed", "mlp"), dtype=self.dtype,
                       name="mlp_in")(xn)
    mlp = nn.with_logical_constraint(nn.gelu(mlp), ("batch", "length", "mlp"))
    mlp = blocks.dense(width, ("mlp", "embed"), dtype=self.dtype, name="mlp_out")(mlp)
    y = x + attn.reshape(b, length, width).astype(x.dtype) + mlp.astype(x.dtype)
    return nn.with_logical_constraint(y, TOKEN_AXES)


class TextAdapter(nn.Module):
  """``num_blocks`` T blocks at the encoder's width on frozen text embeddings (module doc)."""
  num_blocks: int = 2
  num_heads: int = 1
  mlp_ratio: int = 4
  qk_norm: bool = True
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    if text.ndim != 3:
      raise ValueError(f"text embeddings must be [batch, tokens, width], got {text.shape}")
    if mask.shape != text.shape[:2]:
      raise ValueError(f"text mask must be {text.shape[:2]}, got {mask.shape}")
    h = nn.with_logical_constraint(text.astype(jnp.float32), TOKEN_AXES)
    for i in range(self.num_blocks):
      h = TextBlock(self.num_heads, self.mlp_ratio, self.qk_norm, self.attention_impl,
                    self.dtype, name=f"block{i + 1}")(h, mask)
    return h.astype(jnp.float32)
