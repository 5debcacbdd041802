"""Host-local numpy batches -> global ``jax.Array``s sharded over the batch mesh axes.

Each process passes its own slice of the global batch (the pipeline gives process ``p`` the
``p``-th contiguous block); ``jax.make_array_from_process_local_data`` stitches them together.
Host-only fields (``index`` and the task's ``host_fields``: ids, captions) stay on the host, and
so does any field that is not numeric (strings).
"""
from __future__ import annotations

from typing import Iterable

import jax
import ml_dtypes
import numpy as np

from ascan_jax.parallel import sharding as sharding_lib

HOST_ONLY = ("index",)


def device_fields(batch: dict, host_fields: Iterable[str] = ()) -> list[str]:
  """The fields of ``batch`` that go to the devices."""
  skip = set(HOST_ONLY) | set(host_fields)
  return [k for k, v in batch.items()
          if k not in skip and (np.asarray(v).dtype.kind in "biuf"
                                or np.asarray(v).dtype == ml_dtypes.bfloat16)]


def to_global(batch: dict, mesh, rules, global_batch: int,
              host_fields: Iterable[str] = ()) -> dict:
  out = {}
  for k in device_fields(batch, host_fields):
    local = np.asarray(batch[k])
    s = sharding_lib.batch_sharding(mesh, rules, local.ndim, global_batch)
    out[k] = jax.make_array_from_process_local_data(s, local, (global_batch,) + local.shape[1:])
  return out
