"""Logical axis names -> ``NamedSharding``s for parameters, optimizer state and batches.

The same rule semantics as flax (for each array dimension the first rule of its logical name
whose mesh axes are still unused wins), plus one safety: mesh axes that do not divide the
dimension are dropped, so a 3-channel stem kernel or a 10-class head stays replicated on an
8-way mesh instead of failing. Leaves without logical names (BatchNorm statistics, step counters)
are replicated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    chosen = None
    for logical, axes in rules:
      if logical != name or axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
      if not axes:
        continue
      # Keep the longest prefix of the axes whose product divides the dimension.
      while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
      if axes:
        chosen = axes
        break
    if chosen:
      used.update(chosen)
      out.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      out.append(None)
  return P(*out)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for the *unboxed* version of ``boxed_tree`` (same structure after nn.unbox)."""
  def one(x):
    if _is_box(x):
      value = x.value
      return NamedSharding(mesh, spec_for(x.names, value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=_is_box)


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the logical 'batch' axis is split on ``mesh`` under ``rules`` (1 when it
  maps to no mesh axis)."""
  for logical, axes in rules:
    if logical == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return max(1, math.prod(mesh.shape[a] for a in axes if a in mesh.shape))
  return 1


def batch_sharding(mesh: Mesh, rules, ndim: int, batch_dim_size: int) -> NamedSharding:
  """Leading (batch) dimension split over the mesh axes 'batch' maps to; the rest replicated."""
  spec = spec_for(("batch",) + (None,) * (ndim - 1), (batch_dim_size,) + (1,) * (ndim - 1),
                  mesh, rules)
  return NamedSharding(mesh, spec)


def batch_shardings_for(spec: dict, mesh: Mesh, rules) -> dict:
  """Batch shardings for a dict of arrays or ``ShapeDtypeStruct``s (leading dim = batch)."""
  return {k: batch_sharding(mesh, rules, len(v.shape), v.shape[0]) for k, v in spec.items()}


@contextlib.contextmanager
def in_mesh(mesh: Mesh, rules):
  """Trace-time context: flax's logical constraints see the mesh and the rules."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield
