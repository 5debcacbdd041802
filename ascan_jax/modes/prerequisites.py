"""Runs a task must have trained before it starts (``Task.prerequisites``), trained first.

The class-conditional diffusion ``:runlocal`` judges its samples with a classifier that the
classification task trains on the same digits; when that classifier's workdir holds no finished
run, it is trained here, with the ordinary loop (so an interrupted prerequisite resumes, and a
finished one is reused). Every process takes part, like in any training run.
"""
from __future__ import annotations

from absl import logging


def ensure(task, workdir: str) -> None:
  """Trains every unfinished prerequisite of ``task`` (run in ``workdir``) in its own workdir."""
  from ascan_jax import tasks  # pylint: disable=g-import-not-at-top
  from ascan_jax.modes import train as train_mode  # pylint: disable=g-import-not-at-top
  for config, prereq_dir in task.prerequisites(workdir):
    logging.info("prerequisite: training %s in %s", config.task, prereq_dir)
    print(f"prerequisite: training the {config.task} run in {prereq_dir}", flush=True)
    train_mode.train(tasks.get_task(config), config, prereq_dir)
