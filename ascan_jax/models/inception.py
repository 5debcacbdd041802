"""The FID Inception-v3 (TF "inception-2015-12-05" graph) in flax.linen, NHWC, float32.

This is the network behind FID, sFID, Inception Score and precision/recall: it is equal to
pytorch-fid's ``InceptionV3(use_fid_inception=True)``, i.e. torchvision's Inception-v3 with the
FID patches that reproduce the 2015 TensorFlow graph:

* every convolution is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU;
* the pooling branch of the 35x35 ("A", Mixed_5b..5d), 17x17 ("C", Mixed_6b..6e) and the first
  8x8 ("E", Mixed_7b) blocks is a 3x3 stride-1 average pool with padding 1 that does NOT count
  the padded zeros (TF's ``avg_pool`` with SAME padding, ``count_include_pad=False``);
* the pooling branch of the last block (Mixed_7c) is a 3x3 stride-1 *max* pool with padding 1
  (a quirk of the TF graph that pytorch-fid keeps);
* the reduction blocks (Mixed_6a, Mixed_7a) and the stem use unpadded ("VALID") max pools.

Input: NHWC images in [0, 1] (float; uint8 input is divided by 255) of any size. As pytorch-fid
does, they are resized to 299x299 with bilinear interpolation, half-pixel centres, no
antialiasing (``F.interpolate(mode='bilinear', align_corners=False)``; ``jax.image.resize``
with ``method='bilinear', antialias=False`` computes the same thing: a triangle kernel with
half-pixel centres whose weights are renormalised at the borders, which is torch's clamping of
the source coordinate) and scaled to [-1, 1].

Outputs (a dict, float32):

* ``pool``: (N, 2048) the global average pool after Mixed_7c: the FID features (TF
  ``pool_3:0``; pytorch-fid's output block 3).
* ``spatial``: (N, 2023) ADM's sFID features. ADM's evaluator takes the TF tensor
  ``mixed_6/conv:0`` and keeps its first 7 channels: TF's ``mixed_6`` is the fifth 17x17 block
  (mixed, mixed_1, mixed_2 = Mixed_5b..5d; mixed_3 = Mixed_6a; mixed_4..mixed_7 = Mixed_6b..6e),
  i.e. pytorch-fid's ``Mixed_6d``, and ``mixed_6/conv`` is that block's 1x1 branch after its
  BatchNorm and ReLU, i.e. the output of ``Mixed_6d.branch1x1`` (N, 17, 17, 192). Channels
  ``[:7]`` of it, flattened in (H, W, C) order as ADM does on the NHWC TF tensor:
  17 * 17 * 7 = 2023 values.
* ``logits``: (N, 1008) the final fully connected layer ``fc`` (with its bias), what
  pytorch-fid's Inception3 ``fc`` computes.
* ``logits_unbiased``: (N, 1008) the same without the bias: ``pool @ W``. The reference
  Inception Score code (improved-GAN, used by ADM and torch-fidelity's default) reads only the
  weight of ``softmax/logits/MatMul`` and ignores the bias, so use these for comparable IS.

Parameters are named after the torch modules (``Mixed_6d/branch1x1/conv/kernel``,
``.../bn/scale``, batch_stats ``.../bn/mean``, ``.../bn/var``, ``fc/kernel``, ``fc/bias``);
``load_params`` reads the safetensors file written by ``ascan_jax.tools.convert_fid_inception``
(keys ``params/...`` and ``batch_stats/...``) and checks every name and shape. Convolutions
run at ``Precision.HIGHEST`` by default so TPU/GPU do not silently use bf16/TF32 passes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7  # 2023
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
SAFETENSORS_FORMAT = "ascan_jax.fid_inception_v3"

_PairOrInt = int | tuple[int, int]


def _pair(v: _PairOrInt) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias, explicit symmetric padding as in torch) + BatchNorm (eps 1e-3) + ReLU."""
  features: int
  kernel: _PairOrInt
  stride: _PairOrInt = 1
  padding: _PairOrInt = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=jnp.float32,
                param_dtype=jnp.float32, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=jnp.float32,
                     param_dtype=jnp.float32, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """TF-style 3x3/1 average pool with padding 1 that averages only the real pixels."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_valid_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and (count_include_pad=False) pool."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions.

  Returns the block output and its 1x1 branch (the latter is ADM's sFID tensor for Mixed_6d).
  """
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b with an average pool branch, Mixed_7c with a max pool branch)."""
  pool: str  # "avg" (count_include_pad=False) or "max"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3_same(x)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """NHWC bilinear resize equal to torch ``F.interpolate(bilinear, align_corners=False)``."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images  # torch's half-pixel mapping is the identity here, too.
  return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3; returns ``pool``, ``spatial``, ``logits``,
  ``logits_unbiased`` (see the module docstring)."""
  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images (N, H, W, 3), got shape {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    if self.resize_input:
      x = resize_bilinear(x)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    conv = functools.partial(BasicConv, precision=self.precision)
    p = dict(precision=self.precision)
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_valid_s2(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_valid_s2(x)
    x = InceptionA(32, **p, name="Mixed_5b")(x)
    x = InceptionA(64, **p, name="Mixed_5c")(x)
    x = InceptionA(64, **p, name="Mixed_5d")(x)
    x = InceptionB(**p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, **p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, **p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, **p, name="Mixed_6d")(x)
    x, _ = InceptionC(192, **p, name="Mixed_6e")(x)
    x = InceptionD(**p, name="Mixed_7a")(x)
    x = InceptionE("avg", **p, name="Mixed_7b")(x)
    x = InceptionE("max", **p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, dtype=jnp.float32, param_dtype=jnp.float32,
                  precision=self.precision, name="fc")
    logits = fc(pool)
    unbiased = jnp.dot(pool, fc.variables["params"]["kernel"], precision=self.precision)
    spatial = mixed_6_conv[..., :7].reshape(mixed_6_conv.shape[0], -1)
    return {"pool": pool, "spatial": spatial, "logits": logits, "logits_unbiased": unbiased}


# ----------------------------------------------------------------------------- parameters


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, key))
    else:
      out[key] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat ``"params/..."`` / ``"batch_stats/..."`` names -> shapes of the FID Inception."""
  model = FIDInceptionV3()
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  return {k: tuple(v.shape) for k, v in _flatten(abstract).items()}


def check_flat_params(flat: Mapping[str, Any], source: str = "parameters") -> None:
  """Raises one ValueError listing every missing, unexpected and wrongly shaped tensor."""
  expected = expected_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(f"{k}: got {tuple(np.shape(flat[k]))}, expected {expected[k]}"
                 for k in set(expected) & set(flat) if tuple(np.shape(flat[k])) != expected[k])
  if missing or unexpected or wrong:
    lines = [f"{source} do not match the FID Inception-v3 "
             f"({len(expected)} tensors expected, {len(flat)} given):"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if wrong:
      lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(wrong))
    raise ValueError("\n".join(lines))


def variables_from_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Checks flat tensors and returns flax variables ``{"params": ..., "batch_stats": ...}``."""
  check_flat_params(flat)
  for k, v in flat.items():
    if not np.issubdtype(np.asarray(v).dtype, np.floating):
      raise ValueError(f"{k} has dtype {np.asarray(v).dtype}, expected a floating dtype")
  return _unflatten({k: jnp.asarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()})


def load_params(path: str) -> dict[str, Any]:
  """Loads the converted safetensors weights into flax variables (no pickle involved).

  Raises ``ValueError`` naming all missing / unexpected / wrongly shaped tensors at once.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  flat = {}
  with safe_open(path, framework="numpy") as f:
    fmt = (f.metadata() or {}).get("format")
    if fmt is not None and fmt != SAFETENSORS_FORMAT:
      raise ValueError(f"{path}: metadata format is {fmt!r}, expected {SAFETENSORS_FORMAT!r}")
    for k in f.keys():
      flat[k] = f.get_tensor(k)
  try:
    check_flat_params(flat, source=path)
  except ValueError as e:
    raise ValueError(f"{e}\n(write the file with python -m ascan_jax.tools.convert_fid_inception)"
                     ) from None
  return variables_from_flat(flat)


def make_feature_fn(variables: Mapping[str, Any], *, jit: bool = True,
                    **model_kwargs) -> Callable[[Any], dict[str, jax.Array]]:
  """``images (N, H, W, 3) in [0, 1] (or uint8) -> {"pool", "spatial", "logits", ...}``."""
  model = FIDInceptionV3(**model_kwargs)
  fn = lambda v, x: model.apply(v, x)  # noqa: E731
  fn = jax.jit(fn) if jit else fn
  return functools.partial(fn, variables)
