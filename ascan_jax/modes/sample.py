"""``--mode=sample``: a task's samples from a checkpoint (the latest, or
``config.checkpoint.step``), written by ``Task.sample``. Needs no training data."""
from __future__ import annotations

from ascan_jax.train import builder


def sample(task, config, workdir: str) -> dict:
  context = builder.restore(task, config, workdir, config.checkpoint.step)
  return task.sample(context, workdir)
