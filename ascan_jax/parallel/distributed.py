"""Starting JAX's multi-controller runtime, before any backend is touched.

* explicit: ``--coordinator_address``, ``--num_processes``, ``--process_id`` (any platform; on CPU
  the cross-process collectives use gloo);
* automatic: Cloud TPU pod slices (more than one worker in ``TPU_WORKER_HOSTNAMES``) and SLURM
  jobs with more than one task, where ``jax.distributed.initialize()`` finds its peers itself;
  ``ASCAN_DISTRIBUTED=1`` forces the automatic path for other clusters JAX can detect;
* otherwise a single process: nothing to start.
"""
from __future__ import annotations

import os

from absl import logging


def _auto_detect_multiprocess() -> str | None:
  if os.environ.get("ASCAN_DISTRIBUTED") == "1":
    return "ASCAN_DISTRIBUTED=1"
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return f"Cloud TPU pod ({len(hosts)} workers)"
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return f"SLURM ({os.environ['SLURM_NTASKS']} tasks)"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts the distributed runtime when needed; returns whether it did."""
  import jax
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                       f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logging.info("distributed: process %d of %d via %s", process_id, num_processes,
                 coordinator_address)
    return True
  reason = _auto_detect_multiprocess()
  if reason:
    jax.distributed.initialize()
    logging.info("distributed (%s): process %d of %d", reason, jax.process_index(),
                 jax.process_count())
    return True
  return False
