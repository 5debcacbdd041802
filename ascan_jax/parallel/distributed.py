"""Starting JAX's multi-controller runtime, before any backend is touched.

* explicit: ``--coordinator_address``, ``--num_processes``, ``--process_id`` (any platform; on CPU
  the cross-process collectives use gloo);
* automatic, where ``jax.distributed.initialize()`` finds its peers itself:
  - Cloud TPU VMs (``libtpu`` is installed; a pod slice's workers find each other through the
    TPU metadata; on a single-host slice this is a one-process runtime);
  - SLURM jobs with more than one task. With one task per node, each process gets all GPUs of its
    node (JAX's SLURM default is one GPU per process, GPU ``SLURM_LOCALID``), unless
    ``JAX_LOCAL_DEVICE_IDS`` says otherwise;
  - ``ASCAN_DISTRIBUTED=1`` forces it for other clusters JAX can detect (launch/tpu_pod.sh sets it);
* otherwise a single process: nothing to start.
"""
from __future__ import annotations

import importlib.util
import os

from absl import logging


def _slurm_tasks() -> int:
  return int(os.environ.get("SLURM_NTASKS", "1") or 1)


def _slurm_one_task_per_node() -> bool:
  per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
  return per_node.split("(")[0].split(",")[0] == "1"


def _slurm_local_device_ids() -> list[int] | None:
  """All GPUs of the node for one-task-per-node jobs, when the user set nothing else."""
  if os.environ.get("JAX_LOCAL_DEVICE_IDS") or not _slurm_one_task_per_node():
    return None
  gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
  if gpus.isdigit() and int(gpus) > 1:
    return list(range(int(gpus)))
  return None


def auto_detect() -> str | None:
  """Why the runtime should start by itself here, or None for a single process."""
  if os.environ.get("ASCAN_DISTRIBUTED") == "1":
    return "ASCAN_DISTRIBUTED=1"
  if _slurm_tasks() > 1:
    return f"SLURM ({_slurm_tasks()} tasks)"
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return f"Cloud TPU pod ({len(hosts)} workers)"
  if importlib.util.find_spec("libtpu") is not None and os.environ.get("JAX_PLATFORMS", "") in (
      "", "tpu"):
    return "Cloud TPU VM"
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
  reason = auto_detect()
  if not reason:
    return False
  kwargs = {}
  if reason.startswith("SLURM") and _slurm_local_device_ids():
    kwargs["local_device_ids"] = _slurm_local_device_ids()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if reason != "Cloud TPU VM":
      raise
    logging.warning("single process: jax.distributed.initialize() failed on this TPU VM (%s)", e)
    return False
  logging.info("distributed (%s): process %d of %d", reason, jax.process_index(),
               jax.process_count())
  return True
