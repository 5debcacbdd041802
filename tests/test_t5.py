"""The T5 encoder port (models.t5), its tokenizer (data.t5_tokenizer) and the T5 tools.

Parity with transformers' PyTorch ``T5EncoderModel`` / ``T5ForConditionalGeneration`` on random
weights (padded batches, sharded safetensors with an index), the relative position buckets,
transformers loading what ``make_random_t5`` writes, token ids equal to transformers'
``T5Tokenizer`` on the same ``spiece.model``, loading directly into shardings on 8 fake devices
(each device reads only its slice), weight-mismatch and missing-file errors, and
``encode_text`` end to end. The torch tests skip without torch; the tokenizer comparison skips
without transformers.
"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np
import pytest

from ascan_jax import config_defaults
from ascan_jax.data import t5_tokenizer
from ascan_jax.models import hf_checkpoint
from ascan_jax.models import t5
from ascan_jax.parallel import sharding as sharding_lib
from ascan_jax.tools import encode_text
from ascan_jax.tools import make_random_t5
from tests import torch_reference
from tests.helpers import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads local directories only.
TOLERANCE = 1e-4
# A T5 v1.1-shaped encoder at toy size; sequences longer than max_distance reach the log buckets.
SMALL = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=12)
RANDOM_DIR_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16)
_apply = jax.jit(lambda model, params, ids, mask: model.apply({"params": params}, ids, mask),
                 static_argnums=0)


def _captions(n: int, seed: int = 0) -> list[str]:
  """Caption-like lines with enough distinct words for a few hundred sentencepiece pieces."""
  rng = np.random.default_rng(seed)
  words = ("a an the photo painting sketch render of with on in under near beside red blue green "
           "yellow purple golden silver small large tiny huge old young ancient modern cozy snowy "
           "rainy sunny foggy wooden glass metallic fluffy shiny dark bright cat dog horse bird "
           "fish tree house car bicycle boat train plane mountain river lake ocean beach forest "
           "desert city street bridge tower castle garden flower apple banana pizza cake coffee "
           "book lamp chair table window clock guitar piano robot astronaut dragon elephant "
           "giraffe zebra lion tiger penguin owl fox rabbit sunset sunrise morning night winter "
           "summer autumn spring highly detailed cinematic lighting watercolor style").split()
  lines = []
  for _ in range(n):
    text = " ".join(rng.choice(words, rng.integers(4, 14)))
    lines.append(text.capitalize() + rng.choice(["", ".", ", 4k", "!", " (close-up)"]))
  return lines


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
  """A make_random_t5 directory with d_model divisible by 8 and sharded weights."""
  out = str(tmp_path_factory.mktemp("random_t5"))
  make_random_t5.make_random_t5(out, lines=_captions(300), vocab_size=300, seed=3,
                                max_shard_bytes=16_000, **RANDOM_DIR_CONFIG)
  return out


def _padded_batch(vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab_size, (3, 20)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 13:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  return ids, mask


# ---------------------------------------------------------------------------------------------
# Config and parameter mapping.


def test_config_reads_transformers_keys_and_names_bad_values():
  hf_style = dict(SMALL, feed_forward_proj="gated-gelu", model_type="t5", dropout_rate=0.1,
                  n_positions=512, task_specific_params={"x": {}}, torch_dtype="bfloat16",
                  num_decoder_layers=5, is_encoder_decoder=True, tie_word_embeddings=False)
  config = t5.T5Config.from_dict(hf_style)
  assert (config.d_model, config.num_layers, config.is_gated) == (32, 3, True)
  assert config.activation_name == "gelu_new"
  assert t5.T5Config.from_dict(dict(SMALL, feed_forward_proj="relu")).activation_name == "relu"
  assert t5.T5Config.from_dict(t5.T5Config(**SMALL).to_dict()) == t5.T5Config(**SMALL)
  for bad, key in [(dict(feed_forward_proj="gated-swiglu"), "feed_forward_proj"),
                   (dict(feed_forward_proj="fancy-gelu"), "feed_forward_proj"),
                   (dict(d_model=0), "d_model"), (dict(num_heads=2.5), "num_heads"),
                   (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets"),
                   (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon"),
                   (dict(model_type="umt5"), "model_type")]:
    with pytest.raises(ValueError, match=key):
      t5.T5Config.from_dict(dict(SMALL, **bad))


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_param_targets_cover_the_module_with_logical_axes(feed_forward_proj):
  config = t5.T5Config(**SMALL, feed_forward_proj=feed_forward_proj)
  boxed = t5.abstract_params(t5.T5Encoder(config))
  flat = {k: v for k, v in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: hasattr(x, "names"))[0]}
  flat = {tuple(p.key for p in path): leaf for path, leaf in flat.items()}
  targets = t5.param_targets(config)
  assert set(targets) == set(flat)
  for path, target in targets.items():
    assert tuple(target.shape) == flat[path].value.shape, path
  names = {path[-2]: flat[path].names for path in flat if path[0] == "block_0"}
  assert names["q"] == names["k"] == names["v"] == ("embed", "heads")
  assert names["o"] == ("heads", "embed")
  assert names["wo"] == ("mlp", "embed")
  assert names["wi_0" if config.is_gated else "wi"] == ("embed", "mlp")
  assert flat[("shared", "embedding")].names == ("vocab", "embed")
  # Every transformers name is used once, linear weights are transposed, and the
  # state-dict export inverts the mapping.
  assert len({t.name for t in targets.values()}) == len(targets)
  assert targets[("block_1", "attention", "o", "kernel")].name == \
      "encoder.block.1.layer.0.SelfAttention.o.weight"
  assert targets[("block_1", "attention", "o", "kernel")].transpose == (1, 0)


def test_flan_t5_xxl_shape_is_4_7b_parameters_and_fsdp_sharded():
  """Flan-T5-XXL's config (arXiv 2411.04967 §3.3: a 4.7B-parameter, 4096-wide encoder), shapes
  only: every large parameter is split over the 8 fsdp devices, none is whole on one."""
  xxl = t5.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                    num_heads=64, feed_forward_proj="gated-gelu")
  boxed = t5.abstract_params(t5.T5Encoder(xxl))
  shardings = sharding_lib.tree_shardings(boxed, _fsdp_mesh(), config_defaults.DEFAULT_RULES)
  shapes = jax.tree.leaves(nn.unbox(boxed))
  total = sum(int(np.prod(x.shape)) for x in shapes)
  assert 4.7e9 < total < 4.8e9, total
  per_device = sum(int(np.prod(s.shard_shape(x.shape)))
                   for x, s in zip(shapes, jax.tree.leaves(shardings)))
  assert per_device < total / 8 * 1.001, (per_device, total)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_low_precision_compute_stays_close(random_dir, dtype):
  model32, params = t5.from_pretrained(random_dir)
  model16, params16 = t5.from_pretrained(random_dir, dtype=dtype)
  ids, mask = _padded_batch(model32.config.vocab_size, seed=3)
  full, low = (np.asarray(_apply(m, p, ids, mask)) for m, p in ((model32, params),
                                                                 (model16, params16)))
  assert low.dtype == np.float32
  assert np.abs(low - full).max() < 0.05 * np.abs(full).max()
  assert np.abs(low - full).max() > 0  # the matmuls did run in low precision.


# ---------------------------------------------------------------------------------------------
# Parity with transformers (PyTorch).


def _torch_encode(torch_encoder, torch, ids, mask):
  with torch.no_grad():
    return torch_encoder(input_ids=torch.from_numpy(ids.astype(np.int64)),
                         attention_mask=torch.from_numpy(mask.astype(np.int64))
                         ).last_hidden_state.numpy()


@pytest.mark.parametrize("variant", ["v1.1-encoder-sharded", "original-full-model"])
def test_parity_with_transformers(variant, tmp_path):
  torch = torch_reference.import_torch()
  transformers = pytest.importorskip("transformers")
  gated = variant.startswith("v1.1")
  hf_config = transformers.T5Config(**SMALL, feed_forward_proj="gated-gelu" if gated else "relu")
  torch.manual_seed(0)
  if gated:  # A T5EncoderModel saved as shards with an index.
    torch_model = transformers.T5EncoderModel(hf_config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    torch_encoder = torch_model
  else:  # A whole encoder-decoder checkpoint: decoder.* is ignored.
    torch_model = transformers.T5ForConditionalGeneration(hf_config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    torch_encoder = torch_model.get_encoder()
  ids, mask = _padded_batch(SMALL["vocab_size"])
  expected = _torch_encode(torch_encoder, torch, ids, mask)
  model, params = t5.from_pretrained(str(tmp_path))
  ours = np.asarray(_apply(model, params, ids, mask))
  error = float(np.abs(ours - expected).max())
  print(f"T5 parity {variant}: max abs error {error:.2e} (outputs up to "
        f"{np.abs(expected).max():.2f})")
  assert ours.shape == expected.shape == (3, 20, SMALL["d_model"])
  assert error < TOLERANCE
  # The bucketing itself, over distances past max_distance in both directions.
  attention = torch_model.encoder.block[0].layer[0].SelfAttention
  for buckets, max_distance in [(8, 12), (32, 128)]:
    relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    theirs = attention._relative_position_bucket(relative, True, buckets, max_distance).numpy()
    np.testing.assert_array_equal(
        t5.relative_position_buckets(300, 300, buckets, max_distance), theirs)


def test_transformers_loads_make_random_t5_output(random_dir):
  torch = torch_reference.import_torch()
  transformers = pytest.importorskip("transformers")
  torch_model = transformers.T5EncoderModel.from_pretrained(random_dir).eval()
  model, params = t5.from_pretrained(random_dir)
  ids, mask = _padded_batch(model.config.vocab_size, seed=1)
  expected = _torch_encode(torch_model, torch, ids, mask)
  np.testing.assert_allclose(np.asarray(_apply(model, params, ids, mask)), expected,
                             atol=TOLERANCE, rtol=0)
  # transformers' own initialisation statistics: q has std (d_model * d_kv) ** -0.5.
  q = params["block_0"]["attention"]["q"]["kernel"]
  np.testing.assert_allclose(float(np.std(q)), (32 * 8) ** -0.5, rtol=0.15)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("spiece")
  with open(out / t5_tokenizer.SPIECE_NAME, "wb") as f:
    f.write(make_random_t5.train_spiece(_captions(400, seed=1), vocab_size=300))
  return str(out)


def _tricky_texts(seed=0, n=150):
  rng = np.random.default_rng(seed)
  parts = list("abcxyz ABC.,!?'-()0123") + [
      " ", "  ", "\t", "\n", "\u3000", "\u00a0", "\u200b", "é", "日本", "ﬁ", "Ａ", "🙂", "<pad>",
      "</s>", "<unk>", "<extra_id_0>", "<extra_id_99>", "<extra_id_100>", "<extra_", "▁", "cat",
      " photo ", "of"]
  return ["".join(rng.choice(parts, rng.integers(0, 20))) for _ in range(n)]


def test_tokenizer_matches_transformers(spiece_dir):
  transformers = pytest.importorskip("transformers")
  theirs = transformers.T5Tokenizer.from_pretrained(spiece_dir)
  ours = t5_tokenizer.T5Tokenizer.from_directory(spiece_dir)
  assert ours.num_pieces >= 150 and ours.vocab_size == len(theirs)
  long_caption = " ".join(_captions(6, seed=5))
  texts = ["a photo of a cat", "", long_caption, "A red dog on the beach, 4k!", "   ",
           "an <extra_id_3> sentinel and </s> in text"] + _tricky_texts()
  for max_length in (8, 32):
    ids, mask = ours.encode(texts, max_length)
    expected = theirs(texts, max_length=max_length, padding="max_length", truncation=True)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"]))
  ids, mask = ours.encode(["", long_caption], 16)
  assert ids[0, 0] == ours.eos_id == 1 and mask[0].tolist() == [1] + [0] * 15
  assert ids[1, -1] == 1 and mask[1].all()  # truncated, EOS kept last.


def test_tokenizer_errors(spiece_dir, tmp_path):
  tok = t5_tokenizer.T5Tokenizer.from_directory(spiece_dir)
  with pytest.raises(ValueError, match="text 1 is not valid UTF-8"):
    tok.encode(["fine", b"\xff\xfe bad"], 8)
  with pytest.raises(ValueError, match="text 0 is not valid Unicode"):
    tok.encode(["lone surrogate \udcff"], 8)
  with pytest.raises(TypeError, match="text 2 is a NoneType"):
    tok.encode(["a", "b", None], 8)
  with pytest.raises(TypeError, match="a list of texts"):
    tok.encode("a single string", 8)
  with pytest.raises(ValueError, match="max_length"):
    tok.encode(["a"], 0)
  np.testing.assert_array_equal(tok.encode([b"a cat"], 8)[0], tok.encode(["a cat"], 8)[0])
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    t5_tokenizer.T5Tokenizer.from_directory(str(tmp_path))
  (tmp_path / "spiece.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    t5_tokenizer.T5Tokenizer.from_directory(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Sharded loading.


def _fsdp_mesh():
  return jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_sharded_load_reads_only_each_devices_slice(random_dir, monkeypatch):
  plain_model, plain = t5.from_pretrained(random_dir)
  reads = []  # (tensor name, bytes returned) of every read.
  original = hf_checkpoint.SafetensorsCheckpoint.get_slice

  def spy(self, name, index):
    part = original(self, name, index)
    reads.append((name, part.nbytes))
    return part

  monkeypatch.setattr(hf_checkpoint.SafetensorsCheckpoint, "get_slice", spy)
  monkeypatch.setattr(hf_checkpoint.SafetensorsCheckpoint, "get",
                      lambda *a: pytest.fail("a whole tensor was read"))
  mesh, rules = _fsdp_mesh(), config_defaults.DEFAULT_RULES
  model, params = t5.from_pretrained(random_dir, mesh=mesh, rules=rules)
  q = params["block_0"]["attention"]["q"]["kernel"]
  assert q.sharding.spec == P("fsdp", None)
  assert len({str(i) for i in q.sharding.devices_indices_map(q.shape).values()}) == 8
  assert params["shared"]["embedding"].sharding.spec == P(None, "fsdp")
  targets = t5.param_targets(model.config)
  sharded = {path for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if not leaf.sharding.is_fully_replicated}
  sharded = {tuple(p.key for p in path) for path in sharded}
  assert len(sharded) >= 5 * model.config.num_layers  # every kernel and scale of every block.
  for path in sharded:
    full = int(np.prod(targets[path].shape)) * 4
    sizes = [n for name, n in reads if name == targets[path].name]
    assert max(sizes) <= full // 8, path  # never more than one device's shard per read ...
    assert sum(sizes) == full, path  # ... and each byte once.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, plain)
  # The sharded model computes what the unsharded one does.
  ids, mask = _padded_batch(model.config.vocab_size, seed=2)
  ids, mask = np.tile(ids, (8 // 3 + 1, 1))[:8], np.tile(mask, (8 // 3 + 1, 1))[:8]

  def apply(params, ids, mask):
    with sharding_lib.in_mesh(mesh, rules):
      return model.apply({"params": params}, ids, mask)

  batch = sharding_lib.batch_sharding(mesh, rules, 2, 8)
  out = jax.jit(apply, in_shardings=(jax.tree.map(lambda a: a.sharding, params), batch, batch))(
      params, ids, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_apply(plain_model, plain, ids, mask)),
                             atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_weight_mismatches_are_listed_in_one_error(random_dir, tmp_path):
  checkpoint = hf_checkpoint.SafetensorsCheckpoint(random_dir)
  tensors = {name: checkpoint.get(name) for name in checkpoint.names()}
  del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
  tensors["encoder.block.7.layer.0.SelfAttention.q.weight"] = np.zeros((4, 4), np.float32)
  tensors["encoder.final_layer_norm.weight"] = np.ones(31, np.float32)
  # Ignored: a decoder, an LM head and the tied copy of the embedding.
  tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((4, 4), np.float32)
  tensors["lm_head.weight"] = np.zeros((4, 4), np.float32)
  tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
  hf_checkpoint.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
  (tmp_path / "config.json").write_text(open(os.path.join(random_dir, "config.json")).read())
  with pytest.raises(hf_checkpoint.WeightsMismatchError) as e:
    t5.from_pretrained(str(tmp_path))
  message = str(e.value)
  for expected in ("1 missing", "encoder.block.1.layer.0.SelfAttention.k.weight",
                   "1 unexpected", "encoder.block.7.layer.0.SelfAttention.q.weight",
                   "1 tensors with the wrong shape",
                   "encoder.final_layer_norm.weight: expected (32,), found (31,)",
                   "T5 encoder config (d_model=32"):
    assert expected in message, message
  for ignored in ("decoder.", "lm_head", "embed_tokens"):
    assert ignored not in message


def test_missing_directory_and_bad_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    t5.from_pretrained(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    t5.from_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text('{"feed_forward_proj": "gated-swish2"}')
  with pytest.raises(ValueError, match="config.json: .*feed_forward_proj 'gated-swish2'"):
    t5.from_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text('{"d_model": 8,')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    t5.from_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text('{"d_model": 8}')
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
    t5.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# encode_text.


def test_encode_text_end_to_end(random_dir, tmp_path):
  prompts = ["a photo of a cat", "", "a red dog on the beach at sunset, highly detailed, 4k"]
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
  output = tmp_path / "out.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "ascan_jax.tools.encode_text", f"--text_encoder={random_dir}",
       f"--prompts={prompts_file}", f"--output={output}", "--max_length=12", "--batch_size=8"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "encoded 3 prompts" in proc.stdout and "on 8 devices" in proc.stdout
  data = np.load(output)
  assert data["embeddings"].shape == (3, 12, 32) and data["embeddings"].dtype == np.float32
  assert data["mask"].dtype == data["input_ids"].dtype == np.int32
  assert data["prompts"].tolist() == prompts
  tokenizer = t5_tokenizer.T5Tokenizer.from_directory(random_dir)
  ids, mask = tokenizer.encode(prompts, 12)
  np.testing.assert_array_equal(data["mask"], mask)
  np.testing.assert_array_equal(data["input_ids"], ids)
  assert mask[1].tolist() == [1] + [0] * 11 and mask[2].all()  # empty prompt; truncated one.
  model, params = t5.from_pretrained(random_dir)
  np.testing.assert_allclose(data["embeddings"], np.asarray(_apply(model, params, ids, mask)),
                             atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="batch_size 12 is not a multiple of the 8 devices"):
    encode_text.TextEncoder(random_dir, batch_size=12)
  # Missing inputs: one clear line, no traceback.
  proc = subprocess.run(
      [sys.executable, "-m", "ascan_jax.tools.encode_text", f"--text_encoder={tmp_path}/none",
       f"--prompts={prompts_file}", f"--output={output}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"text encoder directory {tmp_path}/none does not exist" in proc.stderr


def test_read_prompts(tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes(b"first\r\n\nthird \xc3\xa9\n")
  assert encode_text.read_prompts(str(path)) == ["first", "", "third é"]
  path.write_bytes(b"\n")
  assert encode_text.read_prompts(str(path)) == [""]
  path.write_bytes(b"ok\nbad \xff\n")
  with pytest.raises(ValueError, match="not UTF-8: line 2"):
    encode_text.read_prompts(str(path))
  with pytest.raises(FileNotFoundError, match="prompts file .*missing.txt not found"):
    encode_text.read_prompts(str(tmp_path / "missing.txt"))
