"""The device mesh from ``config.mesh``: axis names and sizes, one of which may be -1.

Axes are ``Auto`` (GSPMD) so flax logical constraints and ``with_sharding_constraint`` apply;
``jax.make_mesh`` alone would default to ``Explicit`` axes in this JAX version.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from ascan_jax import config_validation


def make_mesh(config, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = config_validation.mesh_shape(config, len(devices))
  axes = tuple(config.mesh.axes)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def rules(config) -> tuple[tuple[str, object], ...]:
  """The logical-axis rules as a tuple of (logical name, mesh axes or None)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.rules)
