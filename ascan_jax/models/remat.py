"""Rematerialisation (activation checkpointing) policies, chosen by name in the config."""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory).
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block.
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul/conv outputs.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(module_cls, policy: str, static_argnums=(2,)):
  """``module_cls`` wrapped in ``nn.remat`` with the named policy (or unchanged for 'none')."""
  if policy not in POLICIES:
    raise ValueError(f"remat policy {policy!r} is not one of {sorted(POLICIES)}")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=POLICIES[policy], static_argnums=static_argnums)
