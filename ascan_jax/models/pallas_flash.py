"""The Pallas TPU flash-attention kernel behind ``dot_product_attention(implementation='pallas')``.

Wraps ``jax.experimental.pallas.ops.tpu.flash_attention`` (used unchanged) for ``[B, N, H, D]``
inputs so that nothing of size ``N x N`` exists outside the kernel unless the caller passed a
dense bias:

* **No bias**: the kernel gets ``ab=None``; it then neither reads a bias nor returns a ``dab``.
* **Padding**: tokens are padded to a multiple of 128 (the kernel's minimum key block, and the
  TPU lane width). Real tokens get segment id 0 and padded ones 1, and the kernel's segment mask
  keeps real queries off padded keys (padded queries see only padded keys, so they stay finite;
  they are sliced off). The kernel broadcasts the ids to ``[B, N, 128]`` int32 (O(N), not N²).
* **Dense bias** ``[1|B, H, N, N]``: the kernel accepts ``ab`` only as exactly ``[B, H, N, N]``
  (its wrapper checks the shape, its BlockSpecs index ``ab`` by example, and its dq kernel writes
  ``dab`` per example), so a batch-1 bias is broadcast here: ``B*H*N²`` float32 forward and the
  same again for ``dab``. Fine for the classifier's T blocks (at most 784 tokens at 224²); large
  grids should use ``separable_bias.SeparableBias``.
* **SeparableBias**: folded exactly into ``h + w`` extra query/key feature columns (see
  ``separable_bias``); ``v`` is zero-padded to the same head dim because the kernel needs
  ``d_v == d_qk``; the extra output columns are dropped.
* **Head dim**: the kernel takes ``d <= 128`` or a multiple of 128; others are zero-padded up
  (this changes nothing: the zero columns add 0 to ``q.k`` and give zero output columns).
* **Block sizes**: ``block_sizes_for``.

``flash_attention_sharded`` runs the kernel per shard under ``shard_map`` (a custom kernel is
not partitioned by GSPMD): batch over the mesh axes of ``batch``, heads over those of ``heads``
when they divide the head count, else replicated (see ``attention.heads_spec``).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascan_jax.models import separable_bias as separable_lib
from ascan_jax.parallel import sharding as sharding_lib

LANES = 128  # TPU lane width; the kernel's minimum key block and its head-dim granule.
BLOCK_CHOICES = (512, 256, 128)


def padded_length(n: int) -> int:
  """Token count after padding to the kernel's 128-token granule."""
  return -(-n // LANES) * LANES


def kernel_head_dim(d: int) -> int:
  """The head dim the kernel accepts for ``d``: ``d`` itself up to 128, else the next multiple
  of 128 (the kernel raises NotImplementedError for e.g. 160)."""
  return d if d <= LANES else -(-d // LANES) * LANES


def block_sizes_for(seq_len: int, head_dim: int):
  """``BlockSizes`` for a padded sequence of ``seq_len`` (a multiple of 128) tokens.

  Rule (reasoned, not tuned: no TPU was available to measure):

  * ``block`` = the largest of 512 / 256 / 128 that divides ``seq_len`` (256 at most when
    ``head_dim > 128``). Each grid step re-reads a K/V tile from HBM per query block and pays a
    fixed step cost, so larger query/key blocks mean fewer steps and ``N/block`` instead of
    ``N/128`` passes over K and V; 512 keeps the per-step VMEM working set (q, double-buffered
    k/v tiles, float32 score and probability tiles of ``block x block``: about 1 MiB each at 512,
    plus a same-size ``ab`` tile when there is a bias) at a few MiB, well inside VMEM (whose
    default scoped limit differs by generation). Wider heads halve the cap to keep that budget. Blocks must divide the length
    (the backward kernels check this), hence "largest divisor", not "pad to 512".
  * Forward and the dK/dV backward use ``block`` for every q/k tile and sub-tile.
  * The dQ backward uses ``block`` for queries but 128 for keys: the installed kernel
    broadcasts its ``di`` residual to ``[B, H, N, block_k_major_dq]`` float32 in HBM (and reads
    only the first 128 columns), so a 512 key block would make that buffer 4x larger
    (168 MB instead of 42 MB per example at 16,384 tokens and 5 heads).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only kernel.
  if seq_len % LANES:
    raise ValueError(f"flash attention block sizes need a multiple of {LANES} tokens, got "
                     f"{seq_len}")
  cap = BLOCK_CHOICES[0] if head_dim <= LANES else BLOCK_CHOICES[1]
  block = next(b for b in BLOCK_CHOICES if b <= cap and seq_len % b == 0)
  return tpu_flash.BlockSizes(
      block_q=block, block_k_major=block, block_k=block, block_b=1,
      block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
      block_q_dq=block, block_k_major_dq=LANES, block_k_dq=LANES)


def _as_4d(bias: jax.Array) -> jax.Array:
  return bias.reshape((1,) * (4 - bias.ndim) + bias.shape)


def flash_attention(q, k, v, bias, scale: float) -> jax.Array:
  """``softmax(q k^T * scale + bias) v`` on ``[B, N, H, D]`` with the TPU flash kernel.

  ``bias``: None, an array broadcastable to ``[B, H, N, N]``, or a ``SeparableBias``.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only kernel.
  b, n, h, d = q.shape
  q = q * jnp.asarray(scale, q.dtype)  # the kernel computes (q.k + ab) * sm_scale; sm_scale = 1.
  ab = None
  if isinstance(bias, separable_lib.SeparableBias):
    q_feat, k_feat = bias.query_key_features()
    q = jnp.concatenate([q, jnp.broadcast_to(q_feat.astype(q.dtype), (b,) + q_feat.shape)], -1)
    k_feat = jnp.broadcast_to(k_feat.astype(k.dtype)[:, None], (n, h, k_feat.shape[-1]))
    k = jnp.concatenate([k, jnp.broadcast_to(k_feat, (b,) + k_feat.shape)], -1)
  elif bias is not None:
    ab = jnp.broadcast_to(_as_4d(bias).astype(jnp.float32), (b, h, n, n))
  width = kernel_head_dim(q.shape[-1])
  n_pad = padded_length(n)
  qt, kt, vt = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, N, *]
  qt, kt, vt = (jnp.pad(t, ((0, 0), (0, 0), (0, n_pad - n), (0, width - t.shape[-1])))
                for t in (qt, kt, vt))
  segment_ids = None
  if n_pad != n:
    ids = jnp.broadcast_to((jnp.arange(n_pad) >= n).astype(jnp.int32), (b, n_pad))
    segment_ids = tpu_flash.SegmentIds(q=ids, kv=ids)
    if ab is not None:
      ab = jnp.pad(ab, ((0, 0), (0, 0), (0, n_pad - n), (0, n_pad - n)))
  out = tpu_flash.flash_attention(qt, kt, vt, ab=ab, segment_ids=segment_ids, sm_scale=1.0,
                                  block_sizes=block_sizes_for(n_pad, width))
  return jnp.swapaxes(out[:, :, :n, :d], 1, 2)


def flash_attention_sharded(q, k, v, bias, scale: float) -> jax.Array:
  """``flash_attention`` per shard under ``shard_map`` when a mesh is active."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return flash_attention(q, k, v, bias, scale)
  # Tokens and the head dim stay whole in every shard (attention needs all keys), whatever the
  # rules say about "length"; batch and heads split as the rules say, where they divide.
  qspec = sharding_lib.spec_for(("batch", None, "heads", None), q.shape, mesh, rules)
  batch_axes, heads_axes = qspec[0], qspec[2]
  fn = functools.partial(flash_attention, scale=scale)
  if bias is None:
    return jax.shard_map(lambda q_, k_, v_: fn(q_, k_, v_, None), mesh=mesh,
                         in_specs=(qspec,) * 3, out_specs=qspec, check_vma=False)(q, k, v)
  if isinstance(bias, separable_lib.SeparableBias):
    bspec = jax.sharding.PartitionSpec(heads_axes, None)
    pieces = (bias.row, bias.col)
    height, width = bias.height, bias.width
    rebuild = lambda row, col: separable_lib.SeparableBias(row, col, height, width)  # noqa: E731
  else:
    bias = _as_4d(bias)
    bspec = jax.sharding.PartitionSpec(batch_axes if bias.shape[0] > 1 else None,
                                       heads_axes if bias.shape[1] > 1 else None, None, None)
    pieces = (bias,)
    rebuild = lambda full: full  # noqa: E731
  return jax.shard_map(lambda q_, k_, v_, *p: fn(q_, k_, v_, rebuild(*p)), mesh=mesh,
                       in_specs=(qspec,) * 3 + (bspec,) * len(pieces), out_specs=qspec,
                       check_vma=False)(q, k, v, *pieces)
