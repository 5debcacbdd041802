"""Segmentation metrics (confusion matrix, mIoU/mAcc/aAcc against numpy, sharded == single
device) and inference modes (single scale, multi-scale + flip, sliding window identities)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ascan_jax.eval import segmentation_inference as inference
from ascan_jax.eval import segmentation_metrics as metrics

K = 7


def _random_batch(seed=0, shape=(8, 12, 10)):
  """Predictions and labels with ignore pixels; class 5 never in the labels, class 6 nowhere."""
  rng = np.random.default_rng(seed)
  label = rng.choice([0, 1, 2, 3, 4, 255], size=shape, p=[.3, .2, .2, .1, .1, .1])
  pred = np.where(rng.random(shape) < 0.6, np.where(label == 255, 0, label),
                  rng.integers(0, 6, size=shape))
  return pred.astype(np.int32), label.astype(np.int32)


def _reference(pred, label, keep):
  """mmseg's per-class areas from np.bincount, then its NaN rules, computed independently."""
  valid = keep & (label != 255)
  p, l = pred[valid], label[valid]
  inter = np.bincount(l[p == l], minlength=K).astype(float)
  area_p = np.bincount(p, minlength=K).astype(float)
  area_l = np.bincount(l, minlength=K).astype(float)
  union = area_p + area_l - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = inter / union, inter / area_l
  return {"IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc),
          "aAcc": inter.sum() / area_l.sum()}


@pytest.mark.parametrize("mask_kind", [None, "example", "pixel"])
def test_metrics_match_numpy_reference(mask_kind):
  pred, label = _random_batch()
  rng = np.random.default_rng(1)
  mask = {None: None, "example": np.array([1, 1, 1, 0, 1, 1, 0, 1]),
          "pixel": rng.random(label.shape) < 0.7}[mask_kind]
  keep = np.ones(label.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool).reshape(mask.shape + (1,) * (3 - mask.ndim)), label.shape)
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), K,
                                           mask=None if mask is None else jnp.asarray(mask)))
  assert cm.dtype == np.int32 and cm.sum() == (keep & (label != 255)).sum()
  got, want = metrics.metrics_from_confusion(cm), _reference(pred, label, keep)
  assert np.isnan(got["IoU"][6]) and got["IoU"][5] == 0.0 and np.isnan(got["Acc"][5])
  for key in ("IoU", "Acc"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
  for key in ("mIoU", "mAcc", "aAcc"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


def test_confusion_matrix_sharded_over_8_devices_equals_one_device():
  pred, label = _random_batch(seed=2)
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0])
  want = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), K, mask=jnp.asarray(mask))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch = NamedSharding(mesh, P("data"))
  args = [jax.device_put(a, batch) for a in (pred, label, mask)]
  assert len(args[0].sharding.device_set) == 8
  fn = jax.jit(lambda p, l, m: metrics.confusion_matrix(p, l, K, mask=m),
               out_shardings=NamedSharding(mesh, P()))
  np.testing.assert_array_equal(fn(*args), want)


def test_per_class_table_lists_every_class():
  pred, label = _random_batch()
  m = metrics.metrics_from_confusion(metrics.confusion_matrix(pred, label, K))
  names = [f"class{i}" for i in range(K)]
  table = metrics.per_class_table(m, names)
  rows = [line for line in table.splitlines() if line.startswith("| class")]
  assert len(rows) == K + 1  # the header and one row per class
  assert f"| class1 | {100 * m['IoU'][1]:.2f} | {100 * m['Acc'][1]:.2f} |" in table
  assert "| class6 | nan | nan |" in table
  with pytest.raises(ValueError, match="class names"):
    metrics.per_class_table(m, names[:-1])


# ---- inference ----------------------------------------------------------------------------------
NUM_LOGITS = 4
_W = np.random.default_rng(0).normal(size=(3, NUM_LOGITS)).astype(np.float32) / 50


def pointwise_logits(images):
  """A per-pixel linear map of the colours: padding and windows cannot change a pixel's logits."""
  return np.asarray(images, np.float32) @ _W


def mixing_logits(images):
  """Mixes every pixel with the row and column means and a left-to-right ramp: depends on the
  padding and is not flip-equivariant."""
  x = np.asarray(images, np.float32) / 255.0
  ramp = np.linspace(0.0, 1.0, x.shape[2], dtype=np.float32)[None, None, :, None]
  mixed = x + x.mean(axis=1, keepdims=True) + 0.5 * x.mean(axis=2, keepdims=True)
  return mixed @ (_W * 50) + ramp * np.arange(NUM_LOGITS, dtype=np.float32)


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in sizes]


def test_rescale_size_follows_mmcv():
  assert inference.rescale_size(512, 683, 512, 2048) == (512, 683)
  assert inference.rescale_size(300, 400, 512, 2048) == (512, 683)
  assert inference.rescale_size(100, 1000, 512, 2048) == (205, 2048)  # long side binds.


def test_multi_scale_with_one_scale_and_no_flip_is_single_scale():
  images = _images([(37, 50), (50, 30), (37, 50)])
  kw = dict(short_side=40, long_side=160, batch_size=2)
  single = inference.single_scale(images, mixing_logits, **kw)
  multi = inference.multi_scale_flip(images, mixing_logits, scales=(1.0,), flip=False, **kw)
  for s, m, im in zip(single, multi, images):
    assert s.shape == im.shape[:2] and s.dtype == np.int32
    np.testing.assert_array_equal(s, m)
  scores = inference.view_scores(images, mixing_logits, **kw)
  probs = inference.average_probabilities(images, mixing_logits, scales=(1.0,), flip=False, **kw)
  for s, p in zip(scores, probs):
    np.testing.assert_allclose(p, inference.softmax(s), rtol=1e-6)


def test_flip_averaging_is_symmetric():
  images = _images([(32, 64), (64, 32)])
  kw = dict(short_side=32, long_side=64, scales=(1.0,))  # no resize, no padding.
  flipped = [im[:, ::-1] for im in images]
  probs = inference.average_probabilities(images, mixing_logits, flip=True, **kw)
  probs_of_flipped = inference.average_probabilities(flipped, mixing_logits, flip=True, **kw)
  for p, q in zip(probs, probs_of_flipped):
    np.testing.assert_allclose(q, p[:, ::-1], rtol=1e-6, atol=1e-7)
  # Without flip averaging the function is not symmetric, so the identity above is not trivial.
  plain = inference.average_probabilities(images, mixing_logits, flip=False, **kw)
  plain_flipped = inference.average_probabilities(flipped, mixing_logits, flip=False, **kw)
  assert not np.allclose(plain_flipped[0], plain[0][:, ::-1], atol=1e-3)


def test_sliding_window_inside_one_window_is_whole_image_inference_padded_to_the_crop():
  images = _images([(40, 56), (33, 60)])
  kw = dict(short_side=48, long_side=64, pad_value=(10, 200, 30))  # resized images fit 64x64.
  slide = inference.view_scores(images, mixing_logits, mode="slide", crop=64, stride=43, **kw)
  whole = inference.view_scores(images, mixing_logits, size_divisor=64, **kw)
  for a, b in zip(slide, whole):
    np.testing.assert_array_equal(a, b)
  other_padding = inference.view_scores(images, mixing_logits, size_divisor=16, **kw)
  assert not np.allclose(other_padding[0], whole[0])
  kw["pad_value"] = (0, 0, 0)
  other_value = inference.view_scores(images, mixing_logits, size_divisor=64, **kw)
  assert not np.allclose(other_value[0], whole[0])


def test_sliding_windows_cover_the_image_and_average_by_count():
  images = [im // 2 for im in _images([(50, 131), (97, 50)])]  # pixel values below 128
  kw = dict(short_side=50, long_side=200, batch_size=3,  # no resize; overlapping windows.
            pad_value=(255, 255, 255))
  calls = []

  def counting(batch):
    calls.append(batch.shape)
    assert (batch < 128).all()  # windows lie inside the images: no padding (255) in them.
    return pointwise_logits(batch)

  slide = inference.view_scores(images, counting, mode="slide", crop=(32, 48), stride=(21, 30),
                                **kw)
  assert {c for c in calls} == {(3, 32, 48, 3)}  # one compiled shape
  for im, s in zip(images, slide):
    np.testing.assert_allclose(s, pointwise_logits(im[None].astype(np.float32))[0], rtol=1e-5,
                               atol=1e-5)
  preds = inference.sliding_window(images, pointwise_logits, crop=(32, 48), stride=(21, 30), **kw)
  for im, p in zip(images, preds):
    np.testing.assert_array_equal(p, pointwise_logits(im[None].astype(np.float32))[0].argmax(-1))


def test_predictions_are_at_the_original_resolution_after_rescaling():
  images = _images([(30, 45)])
  preds = inference.multi_scale_flip(images, pointwise_logits, scales=(0.5, 1.25), flip=True,
                                     short_side=40, long_side=100)
  assert preds[0].shape == (30, 45)
  with pytest.raises(ValueError, match="list of images"):
    inference.single_scale(images[0], pointwise_logits)
