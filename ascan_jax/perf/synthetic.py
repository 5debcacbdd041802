"""Benchmark inputs made without a random number generator: parameter trees and batches.

A model's own ``init`` compiles its truncated-normal initialisers together with a forward pass;
on a CPU that takes several times longer than compiling the forward pass alone, and a benchmark
does not care about the values. ``filled_like`` makes any abstract tree (parameters, a whole
train state with optimizer moments and EMA) on the host from a fixed pattern and puts it on the
device with the given shardings; ``host_batch`` draws a batch for a task's ``input_spec``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ONES = ("var", "scale", "nu")  # BatchNorm variances, norm scales, Adam's second moments.
_ZEROS = ("mean", "bias")


def filled_like(abstract_tree, shardings=None, device=None):
  """Arrays shaped like ``abstract_tree``, made on the host without a random number generator
  and put on the device (``shardings``: a tree of shardings, default one ``device``).

  Speed does not depend on the values, but zeros are a special case on some hardware and NaNs
  on others, so: integers are 0, leaves named (anywhere in their path) ``var``/``scale``/``nu``
  are 1 and ``mean``/``bias`` 0, everything else is a fixed bounded non-zero pattern
  (``sin``, period 4093) over ``sqrt(fan_in)``, like a scaled initialiser."""
  pattern = np.sin(np.arange(4093, dtype=np.float32) * 0.7 + 0.3)

  def names(path):
    return {str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path}

  def make(path, leaf):
    n = names(path)
    dtype = np.dtype(leaf.dtype)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, dtype)
    if n & set(_ONES):
      return np.ones(leaf.shape, dtype)
    if n & set(_ZEROS):
      return np.zeros(leaf.shape, dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1])))
    x = np.resize(pattern, leaf.shape)
    x *= np.float32(1.0 / np.sqrt(fan_in))
    return x.astype(dtype, copy=False)

  host = jax.tree_util.tree_map_with_path(make, abstract_tree)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  return jax.device_put(host, shardings)


def host_batch(spec: dict, num_classes: int, seed: int = 1) -> dict:
  """A batch for ``spec`` (a task's ``input_spec``) drawn on the host: uint8 pixels, integer
  labels below ``num_classes``, a ``mask`` of ones, other floats normal."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, s in spec.items():
    if s.dtype == jnp.uint8:
      out[name] = rng.integers(0, 256, s.shape, dtype=np.uint8)
    elif jnp.issubdtype(s.dtype, jnp.integer):
      out[name] = rng.integers(0, num_classes, s.shape).astype(s.dtype)
    elif name == "mask":
      out[name] = np.ones(s.shape, s.dtype)
    else:
      out[name] = rng.standard_normal(s.shape).astype(s.dtype)
  return out
