"""The attention function: implementations agree with ``xla``; relative position bias."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ascan_jax.models import attention
from ascan_jax.train import setup as setup_lib


def _qkv(b, n, h, d, key=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(key), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, d), dtype) for kk in ks[:3])
  bias = jax.random.normal(ks[3], (1, h, n, n), jnp.float32)
  return q, k, v, bias


def _naive(q, k, v, bias):
  """Plain numpy attention, independent of the code under test."""
  q, k, v, bias = (np.asarray(x, np.float64) for x in (q, k, v, bias))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_xla_matches_naive_reference():
  q, k, v, bias = _qkv(2, 49, 3, 16)
  out = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  np.testing.assert_allclose(out, _naive(q, k, v, bias), atol=2e-5)


def test_auto_is_xla_on_cpu_and_unknown_name_is_rejected():
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "cpu") == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "gpu") == "cudnn"
  assert attention.resolve_implementation("auto", jnp.float32, 4096, 64, "gpu") == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 4096, 64, "tpu") == "pallas"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 196, 64, "tpu") == "xla"
  with pytest.raises(ValueError, match="not one of"):
    attention.resolve_implementation("flash", jnp.float32, 16, 16, "cpu")
  with pytest.raises(ValueError, match="cudnn"):
    attention.resolve_implementation("cudnn", jnp.float32, 16, 16, "cpu")


@pytest.mark.parametrize("n", [49, 196])  # not multiples of the kernel block: padded and masked.
def test_pallas_tpu_kernel_matches_xla_in_interpret_mode(n):
  """The TPU flash kernel, run by Pallas' TPU interpreter on CPU, against ``xla``."""
  import jax.experimental.pallas.tpu as pltpu
  q, k, v, bias = _qkv(2, n, 2, 32, key=n)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  with pltpu.force_tpu_interpret_mode():
    out = attention._pallas_attention(q, k, v, bias, q.shape[-1] ** -0.5)
    grad = jax.grad(lambda q: attention._pallas_attention(q, k, v, bias, 32 ** -0.5).sum())(q)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  ref_grad = jax.grad(lambda q: attention.dot_product_attention(
      q, k, v, bias, implementation="xla").sum())(q)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_pallas_under_a_mesh_runs_per_shard():
  import jax.experimental.pallas.tpu as pltpu
  from ascan_jax import config_defaults
  from ascan_jax.parallel import mesh as mesh_lib
  c = config_defaults.classification()
  c.mesh.shape = (4, 1, 2)
  mesh = mesh_lib.make_mesh(c)
  rules = mesh_lib.rules(c)
  q, k, v, bias = _qkv(4, 49, 2, 32, key=3)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")

  def f(q, k, v, bias):
    with setup_lib.in_mesh(mesh, rules):
      return attention._pallas_attention_sharded(q, k, v, bias, 32 ** -0.5)

  with pltpu.force_tpu_interpret_mode():
    sharding = jax.sharding.NamedSharding(mesh, P("data", None, "tensor", None))
    out = jax.jit(f)(*(jax.device_put(t, sharding) for t in (q, k, v)), bias)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_in_bf16():
  q, k, v, bias = _qkv(4, 784, 4, 32, dtype=jnp.bfloat16)
  ref = attention.dot_product_attention(q, k, v, bias, implementation="xla")
  out = attention.dot_product_attention(q, k, v, bias, implementation="cudnn")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_relative_position_bias_lookup_and_resize():
  module = attention.RelativePositionBias(num_heads=2, train_grid=(3, 4))
  variables = nn.unbox(module.init(jax.random.key(0), 3, 4))
  table = np.asarray(variables["params"]["table"])
  bias = np.asarray(module.apply(variables, 3, 4))
  assert bias.shape == (1, 2, 12, 12)
  # Token (0, 0) vs token (2, 3): offset (-2, -3) -> table index (0, 0).
  np.testing.assert_array_equal(bias[0, :, 0, 11], table[:, 0, 0])
  # Same offset, same bias (translation invariance): (1, 1)->(0, 0) and (2, 2)->(1, 1).
  np.testing.assert_array_equal(bias[0, :, 5, 0], bias[0, :, 10, 5])
  other = module.apply(variables, 5, 6)
  assert other.shape == (1, 2, 30, 30)
  assert np.all(np.isfinite(other))


def test_relative_position_index_is_shifted_offsets():
  idx = attention.relative_position_index(2, 3)
  assert idx.shape == (6, 6, 2)
  assert idx.min() == 0 and idx[..., 0].max() == 2 and idx[..., 1].max() == 4
