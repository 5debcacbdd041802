"""UperNet on AsCAN: shapes per feature stages, aux head, logical names, adaptive pooling and
resize rules, BatchNorm/dropout in training, and the segmentation loss against numpy."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascan_jax.models import ascan
from ascan_jax.models import segmentation_loss
from ascan_jax.models import upernet

WIDTHS = (8, 16, 24, 32)


def _model(feature_stages=(2, 3, 4), aux_stage=3, num_classes=5, **kw):
  backbone = ascan.AsCAN(layout="C-C-CT-T", widths=WIDTHS, stem_width=8, num_classes=1,
                         head_dim=8, table_image_size=64, features_only=True,
                         attention_impl="xla")
  return upernet.SegmentationModel(backbone, num_classes, feature_stages=feature_stages,
                                   aux_stage=aux_stage, channels=16, aux_channels=8, **kw)


def _abstract(model, shape, train, with_aux=None):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=train, with_aux=with_aux,
                               rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]),
      variables, x)[0]
  return variables, out


@pytest.mark.parametrize("stages", [(2, 3, 4), (1, 2, 3, 4), (4,)])
def test_logits_at_input_resolution_for_chosen_stages(stages):
  model = _model(feature_stages=stages)
  variables, (logits, aux) = _abstract(model, (2, 64, 96, 3), train=True)
  chex.assert_shape([logits, aux], (2, 64, 96, 5))
  assert logits.dtype == aux.dtype == jnp.float32
  head = variables["params"]["decode_head"]
  # One lateral per level except the coarsest (pyramid pooling), on the requested stages' widths.
  laterals = sorted(k for k in head if k.startswith("lateral"))
  assert len(laterals) == len(stages) - 1
  for i, stage in enumerate(stages[:-1]):
    assert head[f"lateral{i}"]["conv"]["kernel"].value.shape == (1, 1, WIDTHS[stage - 1], 16)
  psp_in = head["psp"]["bottleneck"]["conv"]["kernel"].value.shape
  assert psp_in == (3, 3, WIDTHS[stages[-1] - 1] + 4 * 16, 16)
  assert head["fpn_bottleneck"]["conv"]["kernel"].value.shape == (3, 3, 16 * len(stages), 16)
  # The auxiliary head reads stage 3.
  aux_kernel = variables["params"]["auxiliary_head"]["conv0"]["conv"]["kernel"].value
  assert aux_kernel.shape == (3, 3, WIDTHS[2], 8)


def test_aux_head_only_when_asked_and_its_params_always_exist():
  model = _model()
  variables, (logits, aux) = _abstract(model, (1, 64, 64, 3), train=False)
  assert aux is None and logits.shape == (1, 64, 64, 5)
  assert "auxiliary_head" in variables["params"]
  _, (_, aux) = _abstract(model, (1, 64, 64, 3), train=False, with_aux=True)
  assert aux.shape == (1, 64, 64, 5)
  variables, (_, aux) = _abstract(_model(aux_stage=None), (1, 64, 64, 3), train=True)
  assert aux is None and "auxiliary_head" not in variables["params"]


def test_every_head_parameter_has_logical_axis_names():
  variables, _ = _abstract(_model(), (1, 64, 64, 3), train=False)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for name in ("decode_head", "auxiliary_head"):
    leaves = jax.tree.leaves(variables["params"][name], is_leaf=is_box)
    assert leaves and all(is_box(x) for x in leaves), name
    for box in leaves:
      assert len(box.names) == box.value.ndim
  classifier = variables["params"]["decode_head"]["classifier"]["conv_seg"]["kernel"]
  assert classifier.names[-1] == "classes"


def test_head_output_depends_on_every_level():
  head = upernet.UperNetHead(5, channels=8)
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(2, s, s, c)), jnp.float32)
           for s, c in ((16, 8), (8, 16), (4, 24))]
  variables = _random_variables(head, feats, train=False)
  weights = jnp.asarray(rng.normal(size=(2, 16, 16, 5)), jnp.float32)

  @jax.jit
  def forward_and_grads(variables, feats, weights):
    loss = lambda f: jnp.sum(head.apply(variables, f, train=False) * weights)
    return head.apply(variables, feats, train=False), jax.grad(loss)(feats)

  logits, grads = forward_and_grads(variables, feats, weights)
  assert logits.shape == (2, 16, 16, 5)
  for level, g in enumerate(grads):
    assert np.abs(np.asarray(g)).max() > 0, level


def test_bad_stages_and_backbone_are_named():
  with pytest.raises(ValueError, match="feature_stages"):
    _abstract(_model(feature_stages=(3, 2)), (1, 64, 64, 3), train=False)
  with pytest.raises(ValueError, match="aux_stage"):
    _abstract(_model(aux_stage=5), (1, 64, 64, 3), train=False)
  backbone = ascan.AsCAN(layout="C-C-C-C", widths=WIDTHS, stem_width=8, num_classes=3,
                         head_dim=8, table_image_size=64)
  with pytest.raises(ValueError, match="features_only"):
    jax.eval_shape(lambda: upernet.SegmentationModel(backbone, 5).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


class _TinyConvBackbone(nn.Module):
  """Four strided 3x3 convolutions (strides 4, 8, 16, 32): a cheap real backbone for the
  training-mode checks of the head (the AsCAN wiring is covered by the tests above)."""

  @nn.compact
  def __call__(self, x, train=False):
    feats = []
    for i, width in enumerate(WIDTHS):
      stride = 4 if i == 0 else 2
      x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride))(x))
      feats.append(x)
    return feats


def _random_variables(model, x, **kw):
  """Variables with random numpy values of the model's shapes (skips compiling ``init``)."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kw)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                        abstract["params"])
  stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), abstract["batch_stats"])
  return {"params": params, "batch_stats": stats}


def test_training_mode_updates_batch_norm_and_uses_dropout():
  model = upernet.SegmentationModel(_TinyConvBackbone(), 5, channels=16, aux_channels=8,
                                    dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = _random_variables(model, x)

  @jax.jit
  def run(variables, x):
    train = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)},
                         mutable=["batch_stats"]) for k in (2, 3)]
    return train, model.apply(variables, x, train=False)

  [((logits_a, aux), new_state), ((logits_b, _), _)], (logits, no_aux) = run(variables, x)
  chex.assert_tree_all_finite((logits_a, aux, logits))
  assert no_aux is None
  assert not np.allclose(logits_a, logits_b)  # different dropout draws.
  for head, module in (("decode_head", "fpn_bottleneck"), ("auxiliary_head", "conv0")):
    old = variables["batch_stats"][head][module]["bn"]["mean"]
    assert not np.allclose(old, new_state["batch_stats"][head][module]["bn"]["mean"])


def _resize_reference(x, out_h, out_w):
  """PyTorch's bilinear align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0."""
  def weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
      src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = int(np.floor(src))
      i1 = min(i0 + 1, n_in - 1)
      m[d, i0] += 1 - (src - i0)
      m[d, i1] += src - i0
    return m
  return np.einsum("oh,bhwc,pw->bopc", weights(x.shape[1], out_h), x, weights(x.shape[2], out_w))


def _pool_reference(x, out):
  """PyTorch's adaptive_avg_pool2d rule, written as loops over the bins."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    h0, h1 = int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out))
    for j in range(out):
      w0, w1 = int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out))
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


@pytest.mark.parametrize("h,w", [(16, 16), (7, 5), (13, 9), (2, 3)])
@pytest.mark.parametrize("out", upernet.POOL_SCALES)
def test_adaptive_pool_uses_pytorch_bins(h, w, out):
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  got = np.asarray(upernet.adaptive_avg_pool(jnp.asarray(x), out))
  np.testing.assert_allclose(got, _pool_reference(x, out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(52, 36), (5, 4), (13, 40), (13, 9)])
def test_resize_is_half_pixel_bilinear_without_antialiasing(size):
  x = np.random.default_rng(0).normal(size=(2, 13, 9, 4)).astype(np.float32)
  got = np.asarray(upernet.resize_bilinear(jnp.asarray(x), *size))
  np.testing.assert_allclose(got, _resize_reference(x, *size), atol=1e-5)


def _ce_reference(logits, labels, keep, ignore, normalize):
  logits = logits.astype(np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total, valid, unmasked = 0.0, 0, 0
  for idx in np.ndindex(labels.shape):
    if not keep[idx]:
      continue
    unmasked += 1
    if labels[idx] == ignore:
      continue
    total -= log_p[idx][labels[idx]]
    valid += 1
  return total / (valid if normalize == "valid" else unmasked)


@pytest.mark.parametrize("normalize", ["valid", "all"])
def test_loss_ignores_label_and_masked_examples(normalize):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  aux = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  labels = rng.integers(0, 6, size=(3, 4, 5))
  labels[rng.random(labels.shape) < 0.3] = 255
  example_mask = np.array([1, 1, 0])
  keep = np.broadcast_to(example_mask[:, None, None], labels.shape).astype(bool)
  loss, acc = segmentation_loss.segmentation_loss(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(aux), aux_weight=0.4,
      mask=jnp.asarray(example_mask), normalize=normalize)
  want = (_ce_reference(logits, labels, keep, 255, normalize)
          + 0.4 * _ce_reference(aux, labels, keep, 255, normalize))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  counted = keep & (labels != 255)
  np.testing.assert_allclose(acc, (logits.argmax(-1) == labels)[counted].mean(), rtol=1e-6)


def test_per_device_batch_norm_reaches_both_heads():
  """``batch_norm="per_device"`` normalises each device's shard in the heads too: on 8 devices
  with shards of different statistics the heads' running variances differ from SyncBN's."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ascan_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ascan_jax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  x = x + jnp.arange(8, dtype=jnp.float32)[:, None, None, None]  # shards differ.
  stats = {}
  for kind in ("global", "per_device"):
    model = upernet.SegmentationModel(_TinyConvBackbone(), 5, channels=4, aux_channels=4,
                                      dropout=0.0, pool_scales=(1, 2), batch_norm=kind)
    variables = _random_variables(model, x[:1])

    def run(v, x, model=model):
      with sharding_lib.in_mesh(mesh, config_defaults.DEFAULT_RULES):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

    stats[kind] = jax.jit(run, in_shardings=(None, NamedSharding(mesh, P("data"))))(variables, x)
  for head, module in (("decode_head", "fpn_bottleneck"), ("auxiliary_head", "conv0")):
    var = [np.asarray(stats[k][head][module]["bn"]["var"]) for k in ("global", "per_device")]
    assert not np.allclose(*var, rtol=1e-3), head
