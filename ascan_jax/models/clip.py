"""CLIP (image and text towers) in flax.linen, loading Hugging Face ``CLIPModel`` directories.

What lives here, and why: text-to-image evaluation (CLIP score) and data curation (aesthetic,
watermark and NSFW heads on CLIP image embeddings) need OpenAI/LAION CLIP in JAX, loaded from
the Hugging Face layout without torch.

* ``CLIPConfig`` (``text``, ``vision``, ``projection_dim``, ``logit_scale_init_value`` and the
  ``image_processing`` of ``preprocessor_config.json``), parsed from a ``CLIPModel``
  ``config.json`` with transformers' defaults for missing keys (so a key missing from a file
  means the same thing here as there). The legacy ``text_config_dict`` / ``vision_config_dict``
  keys override ``text_config`` / ``vision_config`` as in transformers. Other keys are ignored;
  values this port cannot reproduce (another ``model_type``, an unknown ``hidden_act``, a list
  ``eos_token_id``, non-square sizes) raise a ``ValueError`` naming the key.
* ``CLIPTextTransformer``, ``CLIPVisionTransformer`` and ``CLIPModel`` (the two towers plus
  ``visual_projection``, ``text_projection`` and ``logit_scale``). Parameters are float32, named
  like transformers' (``text_model/encoder/layers_3/self_attn/q_proj/kernel`` is
  ``text_model.encoder.layers.3.self_attn.q_proj.weight``: ``hf_name``) and carry logical axis
  names (``embed``, ``heads``, ``mlp``); ``dtype`` is the compute dtype, LayerNorm statistics and
  the softmax run in float32. Attention goes through ``models.attention.dot_product_attention``
  (``attention_impl``), the masks as an additive bias.
* ``from_pretrained(directory, dtype=..., mesh=None, rules=None)`` -> ``(model, params)``,
  reading ``config.json``, ``preprocessor_config.json`` (optional) and the safetensors weights
  with ``hf_checkpoint`` (each device reads only its own slice when a mesh is given).
* Jittable functions ``preprocess_images``, ``image_embeddings`` and ``text_embeddings``.

Architecture (transformers' ``modeling_clip``): the vision tower is a ViT: a patch convolution
without bias, a learned class token, learned position embeddings, ``pre_layrnorm``, pre-norm
encoder layers (``x + attn(ln1 x)``, then ``x + fc2(act(fc1(ln2 x)))``), ``post_layernorm`` of
the class token, and ``visual_projection`` without bias. The text tower adds token and position
embeddings, runs the same layers with a causal mask (plus the padding mask when an attention
mask is given), applies ``final_layer_norm`` and pools the hidden state at the first
``eos_token_id``; configs with the legacy ``eos_token_id == 2`` (OpenAI's original uploads) pool
at the argmax of the ids instead (the EOS id is the largest id), exactly as transformers'
``CLIPTextTransformer`` does; then ``text_projection`` without bias.

Image preprocessing (``preprocess_images``, on the device, jittable) reproduces transformers'
``CLIPImageProcessor`` on uint8 images as transformers 5 runs it when torchvision is installed
(its default backend, and what torchmetrics' CLIPScore uses): resize so the shortest side is
``shortest_edge`` (the long side ``int(shortest_edge * long / short)``) with torchvision's
antialiased bicubic, which for uint8 CPU tensors is torch's fixed-point kernel: a width pass
then a height pass (an unchanged axis skipped), each with int16 weights and a uint8 result
(``resize_weights`` has the details); then centre crop (offsets ``int((size - crop) / 2)``,
zero padding if the image is smaller), and ``(x - 255 mean) / (255 std)``. The integer arithmetic
is the same, so the pixels equal torch's exactly; the normalised values differ by float
rounding only (<= 5e-7, measured in ``tests/test_clip.py``). Other resizers give other pixels
(measured on 256..1024 px noise and synthetic images resized to 224): transformers' PIL backend
(fixed point at another precision) 1-2 grey levels on up to 5 % of the pixels; torch's float
kernel (torchvision on a GPU, one rounding at the end and no clamping between the passes) up
to 20 levels at sharp edges and 1 level on about 10 % of the pixels. Images already at the
target size are not resized (as torchvision), so all of these agree on them. Output
``[N, crop, crop, 3]`` float32.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ascan_jax.models import attention as attention_lib
from ascan_jax.models import hf_checkpoint
from ascan_jax.parallel import sharding as sharding_lib

CONFIG_NAME = "config.json"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' utils/constants.py.
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at argmax(ids).
ACTIVATIONS = {  # transformers' ACT2FN names.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}
RESAMPLE_METHODS = {2: "linear", 3: "cubic"}  # PIL codes: BILINEAR, BICUBIC.
_MASKED = -1e30  # additive bias of masked keys (finite, also in bfloat16).


# ---------------------------------------------------------------------------------------------
# Configs.


def _check_positive(owner: str, names: tuple[str, ...], values: Mapping[str, Any]) -> list[str]:
  problems = []
  for name in names:
    v = values[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      problems.append(f"{owner}.{name} must be a positive integer, got {v!r}")
  return problems


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """``text_config`` of a CLIP ``config.json`` (transformers' ``CLIPTextConfig`` defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407
  pad_token_id: int | None = 1

  def __post_init__(self):
    problems = _check_positive("text_config", (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings"), dataclasses.asdict(self))
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"text_config.hidden_act {self.hidden_act!r} is not supported "
                      f"(supported: {sorted(ACTIVATIONS)})")
    if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
      problems.append(f"text_config.eos_token_id must be one integer (the pooling position is "
                      f"the first EOS), got {self.eos_token_id!r}")
    if isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int) and \
        self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
      problems.append(f"text_config.hidden_size {self.hidden_size} is not divisible by "
                      f"num_attention_heads {self.num_attention_heads}")
    if problems:
      raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """``vision_config`` of a CLIP ``config.json`` (transformers' ``CLIPVisionConfig`` defaults)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ("image_size", "patch_size"):  # [n, n] -> n; non-square is not supported.
      v = getattr(self, name)
      if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
          raise ValueError(f"vision_config.{name} {v!r}: only square sizes are supported")
        object.__setattr__(self, name, int(v[0]))
    problems = _check_positive("vision_config", (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_channels", "image_size", "patch_size"), dataclasses.asdict(self))
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"vision_config.hidden_act {self.hidden_act!r} is not supported "
                      f"(supported: {sorted(ACTIVATIONS)})")
    if not problems and self.image_size % self.patch_size:
      problems.append(f"vision_config.image_size {self.image_size} is not a multiple of "
                      f"patch_size {self.patch_size}")
    if not problems and self.hidden_size % self.num_attention_heads:
      problems.append(f"vision_config.hidden_size {self.hidden_size} is not divisible by "
                      f"num_attention_heads {self.num_attention_heads}")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ImageProcessingConfig:
  """``preprocessor_config.json`` of ``CLIPImageProcessor`` (its defaults for missing keys).

  ``shortest_edge`` (resize keeping the aspect ratio) or ``resize_height``/``resize_width``
  (resize to exactly that) -- one of the two is set."""
  shortest_edge: int | None = 224
  resize_height: int | None = None
  resize_width: int | None = None
  crop_height: int = 224
  crop_width: int = 224
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: int = 3  # PIL BICUBIC.

  @classmethod
  def default_for(cls, image_size: int) -> "ImageProcessingConfig":
    """CLIP's preprocessing for a model of ``image_size`` (no preprocessor_config.json)."""
    return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], image_size: int) -> "ImageProcessingConfig":
    """Parses a ``preprocessor_config.json`` (old int sizes included, as transformers does)."""
    kw: dict[str, Any] = {}
    size = d.get("size", {"shortest_edge": image_size})
    if isinstance(size, int):
      size = {"shortest_edge": size}  # CLIPImageProcessor: default_to_square=False.
    if isinstance(size, (list, tuple)) and len(size) == 2:
      size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
      raise ValueError(f"size {size!r} is not understood")
    if "shortest_edge" in size and "longest_edge" not in size:
      kw["shortest_edge"] = int(size["shortest_edge"])
    elif set(size) == {"height", "width"}:
      kw.update(shortest_edge=None, resize_height=int(size["height"]),
                resize_width=int(size["width"]))
    else:
      raise ValueError(f"size {size!r}: only {{'shortest_edge'}} or {{'height', 'width'}} "
                       "are supported")
    crop = d.get("crop_size", {"height": image_size, "width": image_size})
    if isinstance(crop, int):
      crop = {"height": crop, "width": crop}
    if not isinstance(crop, dict) or set(crop) != {"height", "width"}:
      raise ValueError(f"crop_size {crop!r} is not {{'height', 'width'}} or an int")
    kw.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
      if name in d:
        kw[name] = bool(d[name])
    if "rescale_factor" in d:
      kw["rescale_factor"] = float(d["rescale_factor"])
    for name in ("image_mean", "image_std"):
      if name in d:
        v = d[name]
        kw[name] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    kw["resample"] = int(d.get("resample", cls.resample))
    if kw.get("do_resize", True) and kw["resample"] not in RESAMPLE_METHODS:
      raise ValueError(f"resample {kw['resample']} is not supported (supported PIL codes: "
                       f"{RESAMPLE_METHODS})")
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A ``CLIPModel`` ``config.json`` plus its ``preprocessor_config.json``."""
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  image_processing: ImageProcessingConfig | None = None  # None: CLIP's for vision.image_size.

  def __post_init__(self):
    if self.image_processing is None:
      object.__setattr__(self, "image_processing",
                         ImageProcessingConfig.default_for(self.vision.image_size))
    p = self.image_processing
    if (p.crop_height, p.crop_width) != (self.vision.image_size,) * 2 and p.do_center_crop:
      raise ValueError(f"preprocessing crops to {p.crop_height}x{p.crop_width} but the vision "
                       f"tower takes {self.vision.image_size}x{self.vision.image_size} images")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any],
                   preprocessor: Mapping[str, Any] | None = None) -> "CLIPConfig":
    """Parses transformers' ``CLIPConfig`` dict (and a ``preprocessor_config.json`` dict)."""
    model_type = d.get("model_type", "clip")
    if model_type != "clip":
      raise ValueError(f"model_type is {model_type!r}, not 'clip' (only CLIPModel checkpoints "
                       "are supported)")
    towers = {}
    for key, kind in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
      sub = dict(d.get(key) or {})
      sub.update(d.get(key + "_dict") or {})  # the legacy key wins, as in transformers.
      fields = {f.name for f in dataclasses.fields(kind)}
      try:
        towers[key] = kind(**{k: v for k, v in sub.items() if k in fields})
      except TypeError as e:
        raise ValueError(f"{key}: {e}") from None
    vision = towers["vision_config"]
    processing = (None if preprocessor is None
                  else ImageProcessingConfig.from_dict(preprocessor, vision.image_size))
    projection_dim = d.get("projection_dim", 512)
    if not isinstance(projection_dim, int) or projection_dim < 1:
      raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    return cls(text=towers["text_config"], vision=vision, projection_dim=projection_dim,
               logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)),
               image_processing=processing)

  def to_hf_dict(self) -> dict[str, Any]:
    """transformers' ``config.json`` of this ``CLIPModel`` (``CLIPModel.from_pretrained``
    reads it)."""
    return {"architectures": ["CLIPModel"], "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value, "initializer_factor": 1.0,
            "text_config": dict(dataclasses.asdict(self.text), model_type="clip_text_model",
                                projection_dim=self.projection_dim),
            "vision_config": dict(dataclasses.asdict(self.vision),
                                  model_type="clip_vision_model",
                                  projection_dim=self.projection_dim),
            "torch_dtype": "float32"}

  def preprocessor_dict(self) -> dict[str, Any]:
    """transformers' ``preprocessor_config.json`` for ``image_processing``."""
    p = self.image_processing
    size = ({"shortest_edge": p.shortest_edge} if p.shortest_edge is not None
            else {"height": p.resize_height, "width": p.resize_width})
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": p.do_resize, "size": size, "resample": p.resample,
            "do_center_crop": p.do_center_crop,
            "crop_size": {"height": p.crop_height, "width": p.crop_width},
            "do_rescale": p.do_rescale, "rescale_factor": p.rescale_factor,
            "do_normalize": p.do_normalize, "image_mean": list(p.image_mean),
            "image_std": list(p.image_std), "do_convert_rgb": True}


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_config(directory: str) -> CLIPConfig:
  """``CLIPConfig`` of a model directory (``config.json`` and, if present,
  ``preprocessor_config.json``); errors name the file."""
  d = hf_checkpoint.read_config(directory)
  pre_path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
  preprocessor = _read_json(pre_path) if os.path.isfile(pre_path) else None
  try:
    return CLIPConfig.from_hf_dict(d, preprocessor)
  except (TypeError, ValueError) as e:
    where = os.path.join(directory, CONFIG_NAME) + (f" or {pre_path}" if preprocessor else "")
    raise ValueError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Modules.


def _dense(features: int, axes: tuple[str | None, str | None], dtype, name: str,
           use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance in float32, as torch's LayerNorm.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                      use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _embed(num: int, features: int, dtype, name: str) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, "embed")))


class Attention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (with biases)."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads

    def project(name):
      y = _dense(d, ("embed", "heads"), self.dtype, name)(x)
      return y.reshape(b, n, self.num_heads, head_dim)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    out = attention_lib.dot_product_attention(q, k, v, bias, implementation=self.implementation)
    return _dense(d, ("heads", "embed"), self.dtype, "out_proj")(out.reshape(b, n, d))


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.with_logical_constraint(ACTIVATIONS[self.hidden_act](h), ("batch", "length", "mlp"))
    return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(h)


class EncoderLayer(nn.Module):
  """Pre-norm: ``x + attn(ln1 x)``, then ``x + mlp(ln2 x)``."""
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    cfg = self.config
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + Attention(cfg.num_attention_heads, self.dtype, self.attention_impl,
                      name="self_attn")(h, bias)
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
    x = x + MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, self.attention_impl, name=f"layers_{i}")(x, bias)
    return x


class TextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    tokens = _embed(cfg.vocab_size, cfg.hidden_size, self.dtype, "token_embedding")(input_ids)
    positions = _embed(cfg.max_position_embeddings, cfg.hidden_size, self.dtype,
                       "position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


def text_attention_bias(length: int, attention_mask: jax.Array | None) -> jax.Array:
  """``[B or 1, 1, L, L]`` additive bias: causal, plus masked padding keys when a mask is given."""
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def pooling_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Where the text tower pools, per sequence (transformers' rule, see the module docstring)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
  """``input_ids`` ``[B, L]`` (``L <= max_position_embeddings``), optional ``attention_mask``
  ``[B, L]`` (1 = token) -> ``(last_hidden_state [B, L, D], pooled [B, D])``."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"text of {length} tokens is longer than max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    x = TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = Encoder(cfg, self.dtype, self.attention_impl, name="encoder")(
        x, text_attention_bias(length, attention_mask))
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    pooled = jnp.take_along_axis(
        x, pooling_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    return x, pooled


class VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.normal(0.02), (None, None, None, "embed")))(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (cfg.hidden_size,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    positions = _embed(cfg.num_patches + 1, cfg.hidden_size, self.dtype,
                       "position_embedding")(jnp.arange(cfg.num_patches + 1))
    return x + positions[None]


class CLIPVisionTransformer(nn.Module):
  """Normalised images NHWC ``[B, S, S, C]`` (``S = image_size``) ->
  ``(last_hidden_state [B, 1 + patches, D], pooled [B, D])`` (``post_layernorm`` of the class
  token)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"images of shape {tuple(pixels.shape)}; the vision tower takes "
                       f"[batch, {expected[0]}, {expected[1]}, {expected[2]}]")
    x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels.astype(self.dtype))
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = Encoder(cfg, self.dtype, self.attention_impl, name="encoder")(x, None)
    pooled = _layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
    return x, pooled


class CLIPModel(nn.Module):
  """Both towers and their projections; ``model.config`` is the ``CLIPConfig``.

  Methods (for ``model.apply(..., method=...)``): ``get_image_features(pixels)`` and
  ``get_text_features(input_ids, attention_mask=None)``, the projected, unnormalised embeddings
  ``[B, projection_dim]`` in float32 (transformers' ``get_*_features``); ``__call__`` returns
  both plus ``logit_scale`` (used by ``init``).
  """
  config: CLIPConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextTransformer(cfg.text, self.dtype, self.attention_impl)
    self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype, self.attention_impl)
    self.visual_projection = _dense(cfg.projection_dim, ("embed", None), self.dtype,
                                    "visual_projection", use_bias=False)
    self.text_projection = _dense(cfg.projection_dim, ("embed", None), self.dtype,
                                  "text_projection", use_bias=False)
    self.logit_scale = self.param(
        "logit_scale", lambda _: jnp.asarray(cfg.logit_scale_init_value, jnp.float32))

  def get_image_features(self, pixels: jax.Array) -> jax.Array:
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled).astype(jnp.float32)

  def get_text_features(self, input_ids: jax.Array,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    _, pooled = self.text_model(input_ids, attention_mask)
    return self.text_projection(pooled).astype(jnp.float32)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None):
    return (self.get_image_features(pixels), self.get_text_features(input_ids, attention_mask),
            self.logit_scale)


# ---------------------------------------------------------------------------------------------
# Image preprocessing (CLIPImageProcessor on the device).


def resized_size(height: int, width: int, p: ImageProcessingConfig) -> tuple[int, int]:
  """The (height, width) ``CLIPImageProcessor`` resizes an image to."""
  if not p.do_resize:
    return height, width
  if p.shortest_edge is None:
    return p.resize_height, p.resize_width
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(p.shortest_edge * long / short)
  return (p.shortest_edge, new_long) if height <= width else (new_long, p.shortest_edge)


def _aa_filter(x: float, method: str) -> float:
  """torch's antialiasing filters: Keys cubic with a = -0.5 (as PIL), or the triangle."""
  x = abs(x)
  if method == "linear":
    return 1.0 - x if x < 1.0 else 0.0
  a = -0.5
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return 0.0


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int,
                   method: str = "cubic") -> tuple[np.ndarray, np.ndarray, int]:
  """``(first tap [out], int16 weights as int32 [out, taps], precision)``: torch's uint8
  antialiased resize of one axis.

  The facts of ``aten/src/ATen/native/cpu/UpSampleKernel.cpp`` (torch 2.x,
  ``_compute_indices_min_size_weights_aa`` and ``_compute_index_ranges_int16_weights``): scale
  ``in / out``; support ``2 * scale`` for cubic (``1 * scale`` for linear), not below 2 (1); the
  taps of output ``i`` start at ``int(center - support + 0.5)`` with ``center = scale (i + .5)``
  and end before ``int(center + support + 0.5)``; weights ``filter((j - center + .5) / scale)``
  (no ``/ scale`` when upsampling), normalised to sum 1 (a sequential double sum), then stored
  as int16 at the largest ``precision`` (< 22 bits) for which ``0.5 + max_weight *
  2**(precision + 1)`` stays below ``2**15``, rounded half away from zero. Unused taps have
  weight 0."""
  scale = in_size / out_size
  half = 2.0 if method == "cubic" else 1.0
  support = half * scale if scale >= 1.0 else half
  max_taps = int(np.ceil(support)) * 2 + 1
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  starts = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, max_taps), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), max_taps)
    w = [_aa_filter((j + xmin - center + 0.5) * invscale, method) for j in range(xsize)]
    total = 0.0
    for value in w:  # sequential, as torch (numpy's pairwise sum can differ in the last bit).
      total += value
    starts[i] = xmin
    if total != 0.0:
      weights[i, :xsize] = np.asarray(w) / total
  wt_max = weights.max()
  precision = 0
  while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  v = weights * (1 << precision)
  return starts, np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int32), precision


def _resize_axis(x: jax.Array, size: int, axis: int, method: str) -> jax.Array:
  """One separable pass on uint8 levels held as int32 with torch's integer arithmetic,
  ``clip((sum(w * x) + 2**(precision - 1)) >> precision, 0, 255)``, accumulated tap by tap
  (a gather per tap: ``taps`` x cheaper than a dense ``[out, in]`` matrix product)."""
  in_size = x.shape[axis]
  starts, weights, precision = resize_weights(in_size, size, method)
  w_shape = (size,) + (1,) * (x.ndim - axis - 1)  # broadcast over the axes after ``axis``.
  acc = jnp.full(x.shape[:axis] + (size,) + x.shape[axis + 1:], 1 << (precision - 1), jnp.int32)
  for t in range(weights.shape[1]):
    if not weights[:, t].any():
      continue
    taps = jnp.take(x, np.minimum(starts + t, in_size - 1), axis=axis)
    acc = acc + taps * jnp.asarray(weights[:, t].reshape(w_shape))
  return jnp.clip(jnp.right_shift(acc, precision), 0, 255)


def _resize_uint8(x: jax.Array, height: int, width: int, method: str) -> jax.Array:
  """torch's CPU uint8 antialiased resize of NHWC int32 levels: width pass, then height pass
  (an unchanged axis is skipped), each rounded back to uint8 levels."""
  if x.shape[2] != width:
    x = _resize_axis(x, width, 2, method)
  if x.shape[1] != height:
    x = _resize_axis(x, height, 1, method)
  return x


def _center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  h, w = x.shape[1:3]
  if height > h or width > w:  # transformers pads with zeros first (never after a resize).
    top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
    x = jnp.pad(x, ((0, 0), (top, max(height - h, 0) - top), (left, max(width - w, 0) - left),
                    (0, 0)))
    h, w = x.shape[1:3]
  top, left = int((h - height) / 2.0), int((w - width) / 2.0)
  return x[:, top:top + height, left:left + width]


def preprocess_images(images: jax.Array, processing: ImageProcessingConfig) -> jax.Array:
  """uint8 images ``[N, H, W, C]`` (C = 1 or 3) -> the vision tower's input
  ``[N, crop_height, crop_width, 3]`` float32, as ``CLIPImageProcessor`` (module docstring)."""
  p = processing
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3] (grey or RGB), got shape "
                     f"{tuple(images.shape)}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
  x = images.astype(jnp.int32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  height, width = resized_size(x.shape[1], x.shape[2], p)
  if (height, width) != tuple(x.shape[1:3]):
    x = _resize_uint8(x, height, width, RESAMPLE_METHODS[p.resample])
  x = x.astype(jnp.float32)
  if p.do_center_crop:
    x = _center_crop(x, p.crop_height, p.crop_width)
  if p.do_rescale and p.do_normalize:  # transformers fuses both: (x - 255 m) / (255 s).
    mean = jnp.asarray(p.image_mean, jnp.float32) / p.rescale_factor
    std = jnp.asarray(p.image_std, jnp.float32) / p.rescale_factor
    return (x - mean) / std
  if p.do_rescale:
    x = x * p.rescale_factor
  if p.do_normalize:
    x = (x - jnp.asarray(p.image_mean, jnp.float32)) / jnp.asarray(p.image_std, jnp.float32)
  return x


# ---------------------------------------------------------------------------------------------
# Jittable functions. ``params``: the tree ``from_pretrained`` returns (a ``{"params": ...}``
# dict is accepted too). Bind ``model`` with functools.partial or make it static.


def _variables(params):
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return params
  return {"params": params}


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def image_embeddings(model: CLIPModel, params, images: jax.Array, *,
                     normalize: bool = False) -> jax.Array:
  """uint8 images ``[N, H, W, 1|3]`` -> projected image embeddings ``[N, projection_dim]``
  float32: ``preprocess_images`` then ``get_image_features``. Not normalised (transformers'
  ``get_image_features``) unless ``normalize=True`` (unit L2 norm)."""
  pixels = preprocess_images(images, model.config.image_processing)
  out = model.apply(_variables(params), pixels, method=CLIPModel.get_image_features)
  return _l2_normalize(out) if normalize else out


def text_embeddings(model: CLIPModel, params, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None, *,
                    normalize: bool = False) -> jax.Array:
  """Token ids ``[N, L]`` (``data.clip_tokenizer``) and the optional mask -> projected text
  embeddings ``[N, projection_dim]`` float32, unnormalised unless ``normalize=True``."""
  out = model.apply(_variables(params), input_ids, attention_mask,
                    method=CLIPModel.get_text_features)
  return _l2_normalize(out) if normalize else out


# ---------------------------------------------------------------------------------------------
# Parameters <-> Hugging Face names.

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_ROOT_PARAMS = ("logit_scale", "class_embedding")


def hf_name(path: tuple[str, ...]) -> str:
  """A flax parameter path -> its transformers state-dict name.

  ``('text_model', 'encoder', 'layers_3', 'mlp', 'fc1', 'kernel')`` ->
  ``text_model.encoder.layers.3.mlp.fc1.weight``; ``layers_<i>`` is a ModuleList index;
  ``class_embedding`` and ``logit_scale`` are parameters, not modules."""
  if path[-1] in _ROOT_PARAMS:
    return ".".join(path)
  modules = [p.replace("layers_", "layers.") if p.startswith("layers_") else p
             for p in path[:-1]]
  return ".".join(modules + [_LEAF_NAMES[path[-1]]])


def _transpose(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
  """Torch layout -> flax layout: Linear ``[out, in]`` -> ``[in, out]``; Conv OIHW -> HWIO."""
  if path[-1] != "kernel":
    return None
  return (1, 0) if ndim == 2 else (2, 3, 1, 0)


def _example_inputs(config: CLIPConfig):
  v = config.vision
  return (jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
          jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32))


def abstract_params(model: CLIPModel):
  """The boxed (logically partitioned) parameter tree as ShapeDtypeStructs; nothing computed."""
  pixels, ids = _example_inputs(model.config)
  return jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]


def _flat(tree) -> dict[tuple[str, ...], Any]:
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  return {tuple(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]}


def hf_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """``{transformers name: shape in the file's (torch) layout}`` of every weight."""
  out = {}
  for path, leaf in _flat(nn.unbox(abstract_params(CLIPModel(config)))).items():
    shape = tuple(leaf.shape)
    perm = _transpose(path, len(shape))
    if perm is not None:
      stored = [0] * len(shape)
      for model_axis, stored_axis in enumerate(perm):
        stored[stored_axis] = shape[model_axis]
      shape = tuple(stored)
    out[hf_name(path)] = shape
  return out


def _is_buffer(name: str) -> bool:
  return name.endswith(".position_ids")  # non-persistent buffers older checkpoints still hold.


def from_pretrained(directory: str, *, dtype: Any = jnp.float32, mesh=None, rules=None,
                    attention_impl: str = "auto") -> tuple[CLIPModel, Any]:
  """Loads a transformers ``CLIPModel`` directory -> ``(model, params)`` without torch.

  ``dtype`` is the compute dtype (parameters stay float32). With ``mesh`` and ``rules`` (logical
  axis rules, e.g. ``config_defaults.DEFAULT_RULES``) every parameter is created in its
  ``NamedSharding`` and each device reads only its slice; without, parameters go to the default
  device. Missing, unexpected and mis-shaped tensors are listed in one
  ``hf_checkpoint.WeightsMismatchError``.
  """
  if os.path.isfile(directory):
    raise ValueError(f"{directory} is a file; from_pretrained takes the CLIPModel directory "
                     f"that holds {CONFIG_NAME} and the safetensors weights")
  config = load_config(directory)
  model = CLIPModel(config, dtype=jnp.dtype(dtype), attention_impl=attention_impl)
  boxed = abstract_params(model)
  shardings = None
  if mesh is not None:
    if rules is None:
      raise ValueError("from_pretrained: a mesh needs the logical-axis rules too")
    shardings = _flat(sharding_lib.tree_shardings(boxed, mesh, rules))
  targets = {}
  for path, leaf in _flat(nn.unbox(boxed)).items():
    targets[path] = hf_checkpoint.Target(
        hf_name(path), tuple(leaf.shape), np.float32,
        shardings[path] if shardings else None, _transpose(path, len(leaf.shape)))
  checkpoint = hf_checkpoint.SafetensorsCheckpoint(directory)
  t, v = config.text, config.vision
  what = (f"the CLIPModel of {os.path.join(directory, CONFIG_NAME)} (text: {t.num_hidden_layers} "
          f"layers, hidden {t.hidden_size}, vocab {t.vocab_size}; vision: "
          f"{v.num_hidden_layers} layers, hidden {v.hidden_size}, patch {v.patch_size}, image "
          f"{v.image_size}; projection {config.projection_dim})")
  arrays = hf_checkpoint.load_arrays(checkpoint, targets, what=what, ignore_unexpected=_is_buffer)
  return model, hf_checkpoint.unflatten(arrays)


def config_sha256(directory: str) -> str:
  """sha256 of the directory's ``config.json`` bytes (recorded with CLIP scores)."""
  with open(os.path.join(directory, CONFIG_NAME), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


__all__ = [
    "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "ImageProcessingConfig", "CLIPModel",
    "CLIPTextTransformer", "CLIPVisionTransformer", "load_config", "from_pretrained",
    "preprocess_images", "image_embeddings", "text_embeddings", "hf_name", "hf_shapes",
    "config_sha256", "resized_size", "resize_weights", "abstract_params",
]
