"""Host-local numpy batches -> global ``jax.Array``s sharded over the batch mesh axes.

Each process passes its own slice of the global batch (the pipeline gives process ``p`` the
``p``-th contiguous block); ``jax.make_array_from_process_local_data`` stitches them together.
Host-only fields (``index``) stay on the host.
"""
from __future__ import annotations

import jax
import numpy as np

from ascan_jax.parallel import sharding as sharding_lib

HOST_ONLY = ("index",)


def shardings_for(batch: dict, mesh, rules, global_batch: int) -> dict:
  return {k: sharding_lib.batch_sharding(mesh, rules, np.ndim(v), global_batch)
          for k, v in batch.items() if k not in HOST_ONLY}


def to_global(batch: dict, mesh, rules, global_batch: int) -> dict:
  shardings = shardings_for(batch, mesh, rules, global_batch)
  out = {}
  for k, s in shardings.items():
    local = np.asarray(batch[k])
    out[k] = jax.make_array_from_process_local_data(s, local, (global_batch,) + local.shape[1:])
  return out
