"""Tasks: the only task-specific code (model, loss, evaluation, data, sampling).

The contract every task implements, and the registry that maps ``config.task`` to its class,
are in ``ascan_jax.tasks.base``; ``get_task(config)`` returns the task object of a config.
"""
from ascan_jax.tasks.base import (Task, TaskError, config_from_saved, get_task, register,
                                   schema_for, task_class, validate)

__all__ = ["Task", "TaskError", "config_from_saved", "get_task", "register", "schema_for",
           "task_class", "validate"]
