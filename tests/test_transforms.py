"""Pin the training / inference transforms to the published behaviour (EPS util/imutils.py,
metadata/dataset.py, module/dataloader.py, infer.py preprocess; docs/data.md)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import transforms as tf


class StubRng:
    """Deterministic stand-in for the ``random`` module that records every call."""

    def __init__(self, randint=None, flip=0.0, randrange=()):
        self._randint, self._flip, self._rr = randint, flip, list(randrange)
        self.calls = []

    def randint(self, a, b):
        self.calls.append(("randint", a, b))
        return self._randint if self._randint is not None else a

    def random(self):
        self.calls.append(("random",))
        return self._flip

    def randrange(self, n):
        self.calls.append(("randrange", n))
        v = self._rr.pop(0)
        assert 0 <= v < n
        return v


def gradient_rgb(h, w):
    """uint8 RGB image whose pixels are all distinct enough to detect misplacement."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 7 + yy) % 256, (yy * 11 + xx * 3) % 256, (xx * yy) % 256], -1).astype(np.uint8)


# ---------------------------------------------------------------- resize-long
@pytest.mark.parametrize("size,long_,expected", [
    ((300, 500), 256, (154, 256)),   # portrait: w < h -> (round(w*L/h), L), 153.6 -> 154
    ((500, 375), 256, (256, 192)),   # landscape
    ((100, 100), 50, (50, 50)),      # square takes the landscape branch
    ((8, 5), 4, (4, 2)),             # 2.5 -> 2: Python round is half-to-even
    ((8, 5), 12, (12, 8)),           # 7.5 -> 8
    ((5, 8), 4, (2, 4)),             # portrait half-even
])
def test_resize_long_size(size, long_, expected):
    assert tf.resize_long_size(size, long_) == expected


def test_random_resize_long_is_inclusive_and_bicubic():
    rng = StubRng(randint=7)
    r = tf.RandomResizeLong(5, 9, rng=rng)
    img = Image.fromarray(gradient_rgb(10, 14))
    out = r(img)
    assert rng.calls == [("randint", 5, 9)]
    assert out.size == (7, 5)  # 10*7/14 = 5
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((7, 5), Image.BICUBIC)))
    r2 = tf.RandomResizeLong(2, 4, rng=random.Random(0))
    seen = {r2.draw() for _ in range(200)}
    assert seen == {2, 3, 4}
    with pytest.raises(ValueError):
        tf.RandomResizeLong(5, 4)


# ---------------------------------------------------------------- normalize
def test_normalize_matches_formula():
    arr = gradient_rgb(4, 5)
    out = tf.normalize(arr)
    assert out.dtype == np.float32 and out.shape == (4, 5, 3)
    for c in range(3):
        ref = ((arr[..., c] / 255.0 - tf.IMAGENET_MEAN[c]) / tf.IMAGENET_STD[c]).astype(np.float32)
        assert np.array_equal(out[..., c], ref)
    black = tf.normalize(np.zeros((1, 1, 3), np.uint8))[0, 0]
    assert np.allclose(black, [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])


def test_scaled_size_uses_half_even_round():
    assert tf.scaled_size((375, 500), 0.5) == (188, 250)   # 187.5 -> 188
    assert tf.scaled_size((5, 3), 0.5) == (2, 2)           # 2.5 -> 2, 1.5 -> 2
    assert tf.scaled_size((7, 5), 1.5) == (10, 8)          # 10.5 -> 10, 7.5 -> 8
    assert tf.scaled_size((7, 5), 2.0) == (14, 10)


# ---------------------------------------------------------------- crop
def test_crop_smaller_than_image_takes_random_window():
    arr = gradient_rgb(10, 12).astype(np.float32)
    rng = StubRng(randrange=[3, 1])                         # width first, then height
    (out,) = tf.random_crop([arr], 8, rng)
    assert rng.calls == [("randrange", 5), ("randrange", 3)]
    assert out.dtype == np.float32 and out.shape == (8, 8, 3)
    assert np.array_equal(out, arr[1:9, 3:11])


def test_crop_larger_than_image_pads_at_random_offset():
    arr = gradient_rgb(5, 6).astype(np.float32) + 1        # +1: no genuine zero pixels
    rng = StubRng(randrange=[2, 1])
    (out,) = tf.random_crop([arr], 8, rng)
    assert rng.calls == [("randrange", 3), ("randrange", 4)]
    assert np.array_equal(out[1:6, 2:8], arr)
    mask = np.zeros((8, 8), bool)
    mask[1:6, 2:8] = True
    assert np.all(out[~mask] == 0)


def test_crop_mixed_axes_and_equal_size():
    arr = gradient_rgb(10, 4).astype(np.float32) + 1        # taller than crop, narrower than crop
    rng = StubRng(randrange=[1, 2])
    (out,) = tf.random_crop([arr], 6, rng)
    assert rng.calls == [("randrange", 3), ("randrange", 5)]
    assert np.array_equal(out[:, 1:5], arr[2:8])
    assert np.all(out[:, 0] == 0) and np.all(out[:, 5] == 0)
    # equal size: the "pad" branch with randrange(1) -> offset 0, i.e. the image itself
    rng = StubRng(randrange=[0, 0])
    (out,) = tf.random_crop([arr[:6, :4]], 6 - 2, rng) if False else tf.random_crop([arr[:6, :6 - 2]], 4, rng)
    assert rng.calls == [("randrange", 1), ("randrange", 3)]


def test_crop_box_offsets_cover_the_whole_range():
    rng = random.Random(1)
    small = {tf.crop_box(5, 6, 8, rng)[:2] for _ in range(300)}   # (cont_top, cont_left)
    assert small == {(t, l) for t in range(4) for l in range(3)}  # not always top-left
    big = {tf.crop_box(10, 12, 8, rng)[2:4] for _ in range(300)}  # (img_top, img_left)
    assert big == {(t, l) for t in range(3) for l in range(5)}


def test_joint_crop_uses_one_box():
    a = gradient_rgb(9, 11).astype(np.float32)
    b = a[..., :1] * 2
    rng = random.Random(3)
    for _ in range(10):
        ca, cb = tf.random_crop([a, b], 7, rng)
        assert np.array_equal(ca[..., :1] * 2, cb)
    with pytest.raises(ValueError):
        tf.random_crop([a, b[:5]], 7, rng)


# ---------------------------------------------------------------- composed transforms
def test_cls_transform_pipeline_and_padding_is_zero():
    img = Image.fromarray(gradient_rgb(12, 16))
    rng = StubRng(randint=10, flip=0.9, randrange=[1, 2])  # 16x12 -> 10x8 (7.5 -> 8), flip, crop 12
    out = tf.ClsTrainTransform(12, (8, 16), color_jitter=None, rng=rng)(img)
    assert rng.calls == [("randint", 8, 16), ("random",), ("randrange", 3), ("randrange", 5)]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 12, 12)
    ref = tf.normalize(img.resize((10, 8), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT))
    assert tf.resize_long_size((16, 12), 10) == (10, 8)
    expected = np.zeros((12, 12, 3), np.float32)
    expected[2:10, 1:11] = ref
    assert np.array_equal(out.numpy(), expected.transpose(2, 0, 1))
    # padding is 0 after normalization (= the mean colour), not black
    assert torch.all(out[:, :2] == 0) and torch.all(out[:, :, 0] == 0)


def test_default_color_jitter_parameters():
    j = tf.default_color_jitter()
    assert j.brightness == (0.7, 1.3) and j.contrast == (0.7, 1.3) and j.saturation == (0.7, 1.3)
    assert j.hue == (-0.1, 0.1)


def _gray_pair(h, w):
    g = gradient_rgb(h, w)[..., 0]
    img = Image.fromarray(np.repeat(g[..., None], 3, -1))
    sal = Image.fromarray(g, mode="L")  # saliency PNGs are often grayscale; converted to RGB
    return g, img, sal


@pytest.mark.parametrize("flip", [0.9, 0.1])
def test_sal_transform_flip_and_crop_are_joint(flip):
    g, img, sal = _gray_pair(12, 16)
    rng = StubRng(randint=16, flip=flip, randrange=[4, 1])    # keep size; crop 10 from 12x16
    out_img, out_sal = tf.ClsSalTrainTransform(10, (16, 16), color_jitter=None, rng=rng)(img, sal)
    assert out_img.shape == (3, 10, 10) and out_sal.shape == (1, 10, 10)
    assert out_sal.dtype == torch.float32
    gray = (out_img[0].numpy() * tf.IMAGENET_STD[0] + tf.IMAGENET_MEAN[0])  # undo normalize
    assert np.allclose(gray, out_sal[0].numpy(), atol=1e-5)                  # aligned pixel by pixel
    src = g[:, ::-1] if flip > 0.5 else g                                    # flips when random() > 0.5
    assert np.allclose(out_sal[0].numpy(), src[1:11, 4:14] / 255.0, atol=1e-6)


def test_sal_transform_padding_scaling_and_channel_mean():
    img = Image.new("RGB", (6, 4), (10, 20, 30))
    sal = Image.new("RGB", (6, 4), (255, 0, 51))                 # mean of 1, 0, 0.2 = 0.4
    jitter_calls = []

    def jitter(x):                                              # must see the image only
        jitter_calls.append(x.size)
        return x
    rng = StubRng(randint=6, flip=0.0, randrange=[1, 3])        # crop 8 > 6x4: pad both axes
    out_img, out_sal = tf.ClsSalTrainTransform(8, (6, 6), color_jitter=jitter, rng=rng)(img, sal)
    assert jitter_calls == [(6, 4)]
    inside = np.zeros((8, 8), bool)
    inside[3:7, 1:7] = True
    assert np.allclose(out_sal[0].numpy()[inside], 0.4, atol=1e-6)
    assert np.all(out_sal[0].numpy()[~inside] == 0)             # padded saliency = background
    assert np.all(out_img.numpy()[:, ~inside] == 0)             # padded image = mean colour
    assert np.allclose(out_img[0].numpy()[inside], (10 / 255 - 0.485) / 0.229, atol=1e-6)


def test_sal_transform_resizes_both_with_one_length():
    g, img, sal = _gray_pair(12, 16)
    rng = StubRng(randint=8, flip=0.0, randrange=[0, 0])        # 16x12 -> 8x6, crop 8 (pad h)
    out_img, out_sal = tf.ClsSalTrainTransform(8, (8, 16), color_jitter=None, rng=rng)(img, sal)
    ref = np.asarray(sal.convert("RGB").resize((8, 6), Image.BICUBIC))[..., 0] / 255.0
    assert np.allclose(out_sal[0, :6].numpy(), ref, atol=1e-6)
    assert np.all(out_sal[0, 6:].numpy() == 0)
    # Another aspect ratio (16x6 for a 16x12 image) is refused unless stretched (--stretch-saliency).
    with pytest.raises(ValueError, match="another aspect ratio"):
        tf.ClsSalTrainTransform(8, (8, 16))(img, sal.resize((16, 6)))
    stretched = tf.ClsSalTrainTransform(8, (8, 16), color_jitter=None, stretch_saliency=True,
                                        rng=StubRng(randint=8, flip=0.0, randrange=[0, 0]))
    assert stretched(img, sal.resize((16, 6)))[1].shape == (1, 8, 8)


def test_multiscale_arrays_sizes_and_values():
    img = Image.fromarray(gradient_rgb(5, 7))
    arrs = tf.multiscale_arrays(img)
    assert [a.shape for a in arrs] == [(3, 2, 4), (3, 5, 7), (3, 8, 10), (3, 10, 14)]  # 3.5->4, 2.5->2
    ref = tf.normalize(img.resize((10, 8), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(arrs[2], ref)
    assert np.array_equal(arrs[1], tf.normalize(img).transpose(2, 0, 1))
