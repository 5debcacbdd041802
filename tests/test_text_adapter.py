"""The text adapter (two one-head T blocks on frozen text embeddings) and the T2I network."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import t2i
from ascan_jax.models import text_adapter


def _padded(text, length):
  """``text`` [B, n, D] padded with large random values to ``length`` tokens, and its mask."""
  b, n, d = text.shape
  pad = 50.0 * jax.random.normal(jax.random.key(length), (b, length - n, d))
  mask = jnp.concatenate([jnp.ones((b, n), jnp.int32), jnp.zeros((b, length - n), jnp.int32)], 1)
  return jnp.concatenate([text, pad], 1), mask


def test_adapter_is_two_one_head_blocks_and_ignores_the_padding():
  width = 24
  adapter = text_adapter.TextAdapter(attention_impl="xla")
  text = jax.random.normal(jax.random.key(0), (2, 5, width))
  short, short_mask = _padded(text, 7)
  long, long_mask = _padded(text, 12)
  params = jax.jit(adapter.init)(jax.random.key(1), short, short_mask)["params"]
  assert sorted(params) == ["block1", "block2"]
  attention = nn.unbox(params)["block1"]["attention"]
  assert attention["query"]["kernel"].shape == (width, width)  # one head, as wide as the text.
  apply = jax.jit(adapter.apply)
  out_short = apply({"params": params}, short, short_mask)
  out_long = apply({"params": params}, long, long_mask)
  assert out_long.shape == (2, 12, width) and out_long.dtype == jnp.float32
  # The real tokens' outputs depend neither on the padding's values nor on its length.
  np.testing.assert_allclose(out_short[:, :5], out_long[:, :5], atol=1e-5)
  assert float(jnp.abs(out_short[:, :5] - text).max()) > 1e-2  # the blocks do change the text.


def test_t2i_network_reads_the_text_through_the_adapter_with_the_mask():
  # The tiny variant cut to two levels (compile time): one T block per level and in the middle.
  model = t2i.from_variant("tiny", channels=(16, 32), down_layout="C-T", mid_layout="T",
                           attention_impl="xla")
  assert model.adapter.num_blocks == 2 and model.adapter.num_heads == 1
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t = jnp.array([10.0, 700.0])
  text = jax.random.normal(jax.random.key(1), (2, 3, 32))
  padded, mask = _padded(text, 8)
  shapes = jax.eval_shape(model.init, jax.random.key(2), x, t, padded, mask)["params"]
  assert sorted(shapes) == ["adapter", "unet"]
  # Random weights everywhere (the zero-initialised output layer would hide everything; vectors,
  # i.e. norm scales and biases, near one), and no compiled initialiser: only the forward pass
  # is compiled.
  leaves, tree = jax.tree.flatten(nn.unbox(shapes))
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [float(s.ndim == 1) + 0.05 * jax.random.normal(k, s.shape)
                                     for k, s in zip(keys, leaves)])
  apply = jax.jit(model.apply)
  eps = apply({"params": params}, x, t, padded, mask)
  other_padding = padded.at[:, 3:].set(-padded[:, 3:])
  np.testing.assert_allclose(apply({"params": params}, x, t, other_padding, mask), eps,
                             atol=1e-5)
  other_prompt = padded.at[:, :3].add(1.0)
  assert float(jnp.abs(apply({"params": params}, x, t, other_prompt, mask) - eps).max()) > 1e-3
  # The UNet reads the adapter's output, not the raw text.
  moved = {**params, "adapter": jax.tree.map(lambda p: p + 0.1, params["adapter"])}
  assert float(jnp.abs(apply({"params": moved}, x, t, padded, mask) - eps).max()) > 1e-3
