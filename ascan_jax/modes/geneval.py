"""``--mode=geneval``: a task's samples of GenEval's prompts, in GenEval's layout, from a
checkpoint (the latest, or ``config.checkpoint.step``), written by ``Task.geneval``. Needs no
training data."""
from __future__ import annotations

from ascan_jax.train import builder


def geneval(task, config, workdir: str) -> dict:
  context = builder.restore(task, config, workdir, config.checkpoint.step)
  return task.geneval(context, workdir)
