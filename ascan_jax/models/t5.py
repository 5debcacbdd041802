"""The T5 text encoder (T5 v1.1 / Flan-T5 / original T5) in flax.linen, loaded from Hugging Face
model directories without torch.

Text-to-image AsCAN conditions on a frozen Flan-T5-XXL encoder (arXiv 2411.04967, §3.3: 4096-wide,
4.7B encoder parameters); transformers 5 has no Flax T5, so this is the port. What lives here:

* ``T5Config``: the encoder keys of a transformers ``config.json`` (a frozen dataclass with
  transformers' ``T5Config`` defaults). Values this port cannot honour raise a ``ValueError``
  naming the key; keys that do not change the encoder (decoder sizes, dropout, task params,
  ``torch_dtype``, ...) are ignored.
* ``T5Encoder``: token embedding (no scaling), ``num_layers`` pre-norm blocks [RMSNorm,
  self-attention, residual; RMSNorm, feed-forward, residual], a final RMSNorm. As in T5 the
  attention logits are not scaled by 1/sqrt(d_kv), and one bucketed relative position bias,
  whose table belongs to the first layer, is added in every layer. No biases; dropout is left out
  (inference only). ``feed_forward_proj``: ``relu`` (original T5: ``wo(relu(wi x))``),
  ``gated-gelu`` (v1.1 / Flan: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``), ``gated-silu``.
  Input ids ``[B, L]`` and mask ``[B, L]`` (1 = token) -> ``[B, L, d_model]`` float32. Matmuls
  run in ``dtype`` (bfloat16 on accelerators); the residual stream, the norms and the softmax stay
  in float32 (T5 is known to overflow in half precision; a float32 residual costs B*L*d_model*4
  bytes, nothing next to the weights). The initialisers are transformers' T5 ones (normal, std
  scaled per weight kind by ``initializer_factor``), so random models look like theirs.
* Every parameter carries logical axis names (embedding ``(vocab, embed)``, q/k/v
  ``(embed, heads)``, o ``(heads, embed)``, wi ``(embed, mlp)``, wo ``(mlp, embed)``, norm scales
  ``(embed,)``, the bias table ``(None, heads)``), all 2-D ``nn.Dense`` kernels (``DenseGeneral``
  kernels of 3+ dimensions break logical partitioning, flax#3676); the residual stream is
  constrained to ``(batch, length, embed)``.
* ``param_targets(config)`` maps every flax parameter path to its transformers tensor name and
  layout (torch ``[out, in]`` linear weights are flax ``[in, out]`` kernels); ``from_pretrained``
  reads ``config.json`` and one or sharded safetensors through ``models.hf_checkpoint``, creating
  every parameter directly in its sharding when given a mesh (each device reads only its slice),
  so Flan-T5-XXL is never whole on one host or device. ``T5EncoderModel`` and full
  ``T5ForConditionalGeneration`` checkpoints load (``decoder.*`` and ``lm_head.*`` are ignored;
  the embedding is ``shared.weight`` or else ``encoder.embed_tokens.weight``).
  ``save_pretrained`` writes the same layout (used by ``tools.make_random_t5``).

Usage::

  model, params = t5.from_pretrained("flan-t5-xxl", dtype=jnp.bfloat16, mesh=mesh)
  with sharding.in_mesh(mesh, rules):  # inside the jitted function
    embeddings = model.apply({"params": params}, ids, mask)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax import config_defaults
from ascan_jax.models import attention as attention_lib
from ascan_jax.models import hf_checkpoint
from ascan_jax.parallel import sharding as sharding_lib

ACTIVATION_AXES = ("batch", "length", "embed")
MODEL_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1 with another vocabulary; umT5 (per-layer bias) is not.
ACTIVATIONS = {  # transformers' ACT2FN names; "gated-gelu" means gelu_new (tanh) there.
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # in order of preference.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


# ---------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's keys of a transformers T5 ``config.json``, with transformers' defaults."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  pad_token_id: int = 0
  eos_token_id: int = 1

  def __post_init__(self):
    self._validate()

  def _validate(self):
    problems = []
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    buckets = self.relative_attention_num_buckets
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 4:
      problems.append("relative_attention_num_buckets must be an integer >= 4 (half for each "
                      f"direction, half of those exact), got {buckets!r}")
    try:
      self.activation_name  # pylint: disable=pointless-statement
    except ValueError as e:
      problems.append(str(e))
    for name in ("layer_norm_epsilon", "initializer_factor"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        problems.append(f"{name} must be a positive number, got {value!r}")
    for name in ("pad_token_id", "eos_token_id"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        problems.append(f"{name} must be a non-negative integer, got {value!r}")
    if problems:
      raise ValueError("unsupported T5 config: " + "; ".join(problems))

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation_name(self) -> str:
    """transformers' reading of ``feed_forward_proj``: ``[gated-]ACT``; ``gated-gelu`` is the
    tanh approximation (``gelu_new``), a plain ``gelu`` the exact one."""
    proj = self.feed_forward_proj
    parts = proj.split("-") if isinstance(proj, str) else []
    act = parts[-1] if parts else None
    if (len(parts) == 2 and parts[0] != "gated") or len(parts) not in (1, 2) \
        or act not in ACTIVATIONS:
      raise ValueError(f"feed_forward_proj {proj!r} is not supported (supported: 'relu', "
                       "'gated-gelu', 'gated-silu', or [gated-]ACT with ACT in "
                       f"{sorted(ACTIVATIONS)})")
    return "gelu_new" if proj == "gated-gelu" else act

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  def describe(self) -> str:
    """One line naming the sizes, for error messages."""
    return (f"T5 encoder config (d_model={self.d_model}, d_kv={self.d_kv}, d_ff={self.d_ff}, "
            f"num_layers={self.num_layers}, num_heads={self.num_heads}, vocab_size="
            f"{self.vocab_size}, relative_attention_num_buckets="
            f"{self.relative_attention_num_buckets}, feed_forward_proj="
            f"{self.feed_forward_proj!r})")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """Parses a transformers config dict; keys that do not concern the encoder are ignored."""
    model_type = d.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not supported (supported: "
                       f"{list(MODEL_TYPES)})")
    if d.get("is_decoder"):
      raise ValueError("is_decoder is true: this is a decoder config, not an encoder's")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
    if isinstance(kwargs.get("eos_token_id"), list):
      raise ValueError(f"eos_token_id {kwargs['eos_token_id']!r}: one id expected")
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """A transformers ``config.json`` of a ``T5EncoderModel`` with these sizes."""
    d = {"architectures": ["T5EncoderModel"], "model_type": "t5"}
    d.update(dataclasses.asdict(self))
    d.update({"dense_act_fn": self.activation_name, "is_gated_act": self.is_gated,
              "is_encoder_decoder": False, "num_decoder_layers": self.num_layers,
              "dropout_rate": 0.0, "tie_word_embeddings": True, "use_cache": False})
    return d


def load_config(directory: str) -> T5Config:
  """``DIR/config.json`` -> ``T5Config``; errors name the directory, the file or the key."""
  if os.path.isfile(directory):
    raise ValueError(f"{directory} is a file; pass the model directory that holds "
                     f"{hf_checkpoint.CONFIG_NAME} and the safetensors weights")
  path = os.path.join(directory, hf_checkpoint.CONFIG_NAME)
  try:
    d = hf_checkpoint.read_config(directory)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path} holds a {type(d).__name__}, not a JSON object")
  try:
    return T5Config.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Modules.


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """``[query_length, key_length]`` int32 buckets of ``key_pos - query_pos`` (T5, bidirectional).

  Half the buckets are for keys after the query; within each half, distances below a quarter of
  ``num_buckets`` get their own bucket and larger ones share logarithmically wider buckets up to
  ``max_distance`` (everything farther shares the last). float32 arithmetic as in
  transformers / Mesh TensorFlow, so the boundaries fall on the same distances.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) for the exact distances, which are not used.
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def _normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(features: int, std: float, axes: tuple[str, str], *, dtype, param_dtype, name: str):
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=_normal(std, axes))


def constrain(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


class T5LayerNorm(nn.Module):
  """RMSNorm without mean subtraction or bias; statistics and output in float32."""
  epsilon: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return scale.astype(jnp.float32) * (x * jax.lax.rsqrt(variance + self.epsilon))


class RelativePositionBias(nn.Module):
  """The learned ``[num_buckets, heads]`` table -> a ``[1, heads, L, L]`` float32 bias."""
  config: T5Config
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    c = self.config
    table = self.param("embedding", _normal(c.initializer_factor * c.d_model ** -0.5,
                                            (None, "heads")),
                       (c.relative_attention_num_buckets, c.num_heads), self.param_dtype)
    buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [L, L, heads]
    return jnp.transpose(bias, (2, 0, 1))[None]


class T5SelfAttention(nn.Module):
  """Multi-head self-attention without logit scaling; ``bias`` is the shared position bias."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    b, n, _ = x.shape
    f = c.initializer_factor
    stds = {"q": f * (c.d_model * c.d_kv) ** -0.5, "k": f * c.d_model ** -0.5,
            "v": f * c.d_model ** -0.5}

    def project(name):
      y = _dense(c.inner_dim, stds[name], ("embed", "heads"), dtype=self.dtype,
                 param_dtype=self.param_dtype, name=name)(x)
      return y.reshape(b, n, c.num_heads, c.d_kv)

    out = attention_lib.dot_product_attention(project("q"), project("k"), project("v"), bias,
                                              key_mask=mask, implementation="xla", scale=1.0)
    return _dense(c.d_model, f * c.inner_dim ** -0.5, ("heads", "embed"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="o")(out.reshape(b, n, c.inner_dim))


class T5FeedForward(nn.Module):
  """``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) * wi_1 x)``."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    f = c.initializer_factor
    act = ACTIVATIONS[c.activation_name]

    def dense_in(name):
      return _dense(c.d_ff, f * c.d_model ** -0.5, ("embed", "mlp"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)(x)

    h = act(dense_in("wi_0")) * dense_in("wi_1") if c.is_gated else act(dense_in("wi"))
    return _dense(c.d_model, f * c.d_ff ** -0.5, ("mlp", "embed"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="wo")(h)


class T5Block(nn.Module):
  """Pre-norm self-attention and feed-forward, each added to the float32 residual stream."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="attention_norm")(h)
    y = T5SelfAttention(c, **kw, name="attention")(y.astype(self.dtype), bias, mask)
    h = constrain(h + y.astype(jnp.float32))
    y = T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="mlp_norm")(h)
    y = T5FeedForward(c, **kw, name="mlp")(y.astype(self.dtype))
    return constrain(h + y.astype(jnp.float32))


class T5Encoder(nn.Module):
  """``(input_ids [B, L] int, attention_mask [B, L] (1 = token)) -> [B, L, d_model]`` float32.

  Positions the mask marks as padding still get an output (as in transformers); read them
  through the mask. ``dtype`` is the matmul compute dtype, ``param_dtype`` that of new params.
  """
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids "
                       f"shape {input_ids.shape}")
    mask = attention_mask.astype(bool)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, param_dtype=self.param_dtype,
                     embedding_init=_normal(c.initializer_factor, ("vocab", "embed")),
                     name="shared")
    h = constrain(embed(input_ids).astype(jnp.float32))
    bias = RelativePositionBias(c, self.param_dtype, name="relative_attention_bias")(
        input_ids.shape[1])
    for i in range(c.num_layers):
      h = T5Block(c, self.dtype, self.param_dtype, name=f"block_{i}")(h, bias, mask)
    return T5LayerNorm(c.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(h)


# ---------------------------------------------------------------------------------------------
# Parameters <-> transformers tensors.


def param_targets(config: T5Config, shardings: Mapping | None = None, *,
                  dtype: Any = np.float32,
                  embedding_name: str = EMBEDDING_NAMES[0]) -> dict[tuple[str, ...],
                                                                   hf_checkpoint.Target]:
  """``{flax param path: Target}``: where each parameter of ``T5Encoder(config)`` comes from.

  ``shardings`` is a tree (nested dicts, as ``parallel.sharding.tree_shardings`` returns for the
  params) or a flat ``{path: sharding}``; missing entries load onto the default device.
  Linear weights are stored ``[out, in]`` and become ``[in, out]`` kernels (``transpose=(1, 0)``).
  """
  if shardings is not None and not all(isinstance(k, tuple) for k in shardings):
    shardings = traverse_util.flatten_dict(dict(shardings))
  shardings = shardings or {}
  c = config
  targets: dict[tuple[str, ...], hf_checkpoint.Target] = {}

  def add(path, name, shape, transpose=None):
    targets[path] = hf_checkpoint.Target(name, tuple(shape), dtype, shardings.get(path),
                                         transpose)

  add(("shared", "embedding"), embedding_name, (c.vocab_size, c.d_model))
  add(("relative_attention_bias", "embedding"),
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      (c.relative_attention_num_buckets, c.num_heads))
  ff = ("wi_0", "wi_1", "wo") if c.is_gated else ("wi", "wo")
  for i in range(c.num_layers):
    block, torch = f"block_{i}", f"encoder.block.{i}.layer"
    add((block, "attention_norm", "scale"), f"{torch}.0.layer_norm.weight", (c.d_model,))
    for proj in ("q", "k", "v"):
      add((block, "attention", proj, "kernel"), f"{torch}.0.SelfAttention.{proj}.weight",
          (c.d_model, c.inner_dim), (1, 0))
    add((block, "attention", "o", "kernel"), f"{torch}.0.SelfAttention.o.weight",
        (c.inner_dim, c.d_model), (1, 0))
    add((block, "mlp_norm", "scale"), f"{torch}.1.layer_norm.weight", (c.d_model,))
    for proj in ff:
      shape = (c.d_ff, c.d_model) if proj == "wo" else (c.d_model, c.d_ff)
      add((block, "mlp", proj, "kernel"), f"{torch}.1.DenseReluDense.{proj}.weight", shape,
          (1, 0))
  add(("final_layer_norm", "scale"), "encoder.final_layer_norm.weight", (c.d_model,))
  return targets


def abstract_params(model: T5Encoder) -> Any:
  """The *boxed* (logically partitioned) parameter tree as ShapeDtypeStructs; nothing runs."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]


def init_params(model: T5Encoder, key: jax.Array) -> dict:
  """Random parameters with transformers' T5 initialisers (plain arrays, not boxed)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(jax.jit(model.init)(key, ids, ids))["params"]


def _ignored(name: str) -> bool:
  return name.startswith(_IGNORED_PREFIXES)


def load_params(model: T5Encoder, checkpoint: hf_checkpoint.SafetensorsCheckpoint, *,
                mesh: jax.sharding.Mesh | None = None, rules=None) -> dict:
  """Reads ``model``'s parameters from ``checkpoint``: with a ``mesh``, each one is created in
  the sharding its logical axis names get under ``rules`` (default
  ``config_defaults.DEFAULT_RULES``), each device reading only its slice; without one, on the
  default device. Raises ``WeightsMismatchError`` listing every missing, unexpected or
  mis-shaped tensor."""
  shardings = None
  if mesh is not None:
    rules = config_defaults.DEFAULT_RULES if rules is None else rules
    shardings = sharding_lib.tree_shardings(abstract_params(model), mesh, rules)
  embedding = next((n for n in EMBEDDING_NAMES if n in checkpoint), EMBEDDING_NAMES[0])
  targets = param_targets(model.config, shardings, dtype=np.dtype(model.param_dtype),
                          embedding_name=embedding)

  def ignore(name: str) -> bool:  # a tied copy of the embedding, or the decoder / LM head.
    return _ignored(name) or (name in EMBEDDING_NAMES and name != embedding)

  arrays = hf_checkpoint.load_arrays(checkpoint, targets, what=f"the {model.config.describe()}",
                                     ignore_unexpected=ignore)
  return hf_checkpoint.unflatten(arrays)


def from_pretrained(directory: str, *, dtype: Any = jnp.float32,
                    mesh: jax.sharding.Mesh | None = None, rules=None,
                    param_dtype: Any = jnp.float32) -> tuple[T5Encoder, dict]:
  """A transformers T5 directory (``config.json`` + ``model.safetensors`` or shards with
  ``model.safetensors.index.json``) -> ``(T5Encoder, params)``. ``dtype`` is the compute dtype,
  ``param_dtype`` that of the loaded parameters (a frozen encoder can keep bfloat16 weights).
  See ``load_params`` for ``mesh`` and ``rules``. No torch needed."""
  config = load_config(directory)
  model = T5Encoder(config, dtype=dtype, param_dtype=param_dtype)
  checkpoint = hf_checkpoint.SafetensorsCheckpoint(directory)
  return model, load_params(model, checkpoint, mesh=mesh, rules=rules)


def state_dict_from_params(config: T5Config, params: Mapping) -> dict[str, np.ndarray]:
  """Flax parameters -> transformers ``T5EncoderModel`` tensors (numpy, torch layouts)."""
  flat = traverse_util.flatten_dict(dict(nn.unbox(params)))
  out = {}
  for path, target in param_targets(config).items():
    value = np.asarray(flat[path])
    out[target.name] = np.ascontiguousarray(value if target.transpose is None
                                            else np.transpose(value, np.argsort(target.transpose)))
  return out


def save_pretrained(directory: str, config: T5Config, params: Mapping, *,
                    max_shard_bytes: int | None = None) -> list[str]:
  """Writes ``config.json`` and ``model.safetensors`` (or shards and an index) in transformers'
  ``T5EncoderModel`` layout; returns the weight files."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, hf_checkpoint.CONFIG_NAME), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")
  return hf_checkpoint.save_safetensors(os.path.join(directory, "model.safetensors"),
                                        state_dict_from_params(config, params),
                                        max_shard_bytes=max_shard_bytes)
