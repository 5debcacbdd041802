"""The text-to-image AsCAN network: the text adapter plus the text-conditional AsCAN UNet.

``TextToImageUNet`` = ``text_adapter.TextAdapter`` (two T blocks, one head, at the text encoder's
width; paper A.6) feeding ``unet.AsCANUNet`` (the ``t2i`` variant of ``unet_variants``: channels
320/640/1280, 5/10/20 heads, RoPE, query/key RMSNorm, cross-attention in parallel with
self-attention). The text encoder itself (Flan-T5-XXL, ``models.t5``) is frozen and lives outside
this module: the network takes its output, ``text [B, L, D]`` with the padding ``text_mask
[B, L]``, so the same module trains on online encodings and on cached ones. The adapter's output
is the UNet's cross-attention context, masked with the same ``text_mask``.

Call: ``eps = model.apply(variables, x_t, t, text, text_mask, train=...)`` with ``x_t`` NHWC
``[B, H, W, C]``, ``t`` ``[B]`` float timesteps; output float32 ``[B, H, W, C]``. Parameters:
``adapter/...`` and ``unet/...``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import text_adapter
from ascan_jax.models import unet as unet_lib


class TextToImageUNet(nn.Module):
  """eps(x_t, t, text, text_mask): adapter, then the UNet with the adapted text as context."""
  unet: nn.Module
  adapter: nn.Module

  def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array,
               train: bool = False) -> jax.Array:
    context = self.adapter(text, text_mask)
    return self.unet(x, t, context, text_mask.astype(bool), train=train)


def from_variant(name: str = "t2i", *, adapter_blocks: int = 2, adapter_heads: int = 1,
                 adapter_mlp_ratio: int = 4, dtype: Any = jnp.float32,
                 attention_impl: str = "auto", **unet_overrides) -> TextToImageUNet:
  """The adapter and ``unet.from_variant(name, **unet_overrides)``; the adapter's width is the
  UNet's ``context_dim`` (the text encoder's width)."""
  unet = unet_lib.from_variant(name, dtype=dtype, attention_impl=attention_impl,
                               **unet_overrides)
  if unet.context_dim is None:
    raise ValueError("a text-to-image UNet needs a context_dim (the text encoder's width)")
  adapter = text_adapter.TextAdapter(adapter_blocks, adapter_heads, adapter_mlp_ratio,
                                     dtype=dtype, attention_impl=attention_impl)
  return TextToImageUNet(unet=unet, adapter=adapter)
