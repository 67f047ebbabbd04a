"""Dense CRF wrappers (utils/crf.py): shapes, probabilities, parameter presets, edge snapping."""
import numpy as np
import pytest

from utils.crf import CRF_PRESETS, cam_crf, crf_mask, dense_crf

pytest.importorskip("pydensecrf.densecrf")


def two_region_image(h=24, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2:] = (20, 40, 220)
    return img


def test_dense_crf_shape_and_probabilities():
    rng = np.random.default_rng(0)
    img = two_region_image()
    p = rng.random((3, 24, 32)).astype(np.float32)
    for preset in CRF_PRESETS.values():
        q = dense_crf(img, p, **preset)
        assert q.shape == (3, 24, 32) and q.dtype == np.float32
        assert np.all(q >= 0) and np.allclose(q.sum(0), 1.0, atol=1e-4)


def test_dense_crf_snaps_labels_to_image_edges():
    img = two_region_image()
    # A noisy unary whose boundary sits 4 px left of the colour edge at x = 16.
    p = np.full((2, 24, 32), 0.4, np.float32)
    p[0, :, :12], p[1, :, 12:] = 0.6, 0.6
    q = dense_crf(img, p, **CRF_PRESETS["deeplab"])
    lab = q.argmax(0)
    assert (lab[:, :16] == 0).mean() > 0.95 and (lab[:, 16:] == 1).mean() > 0.95


def test_deeplab_and_psa_presets_are_the_published_values():
    assert CRF_PRESETS["deeplab"] == dict(n_iters=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)
    assert CRF_PRESETS["psa"] == dict(n_iters=10, pos_w=3, pos_xy_std=3, bi_w=10, bi_xy_std=80, bi_rgb_std=13)


def test_cam_crf_background_first_and_mask_values():
    img = two_region_image()
    cams = np.zeros((1, 24, 32), np.float32)
    cams[0, :, 16:] = 0.9
    q = cam_crf(img, cams, alpha=4, n_iters=5)
    assert q.shape == (2, 24, 32) and np.allclose(q.sum(0), 1.0, atol=1e-4)
    mask = crf_mask(q, np.array([6]))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 7}
    assert (mask[:, 16:] == 7).mean() > 0.9 and (mask[:, :16] == 0).mean() > 0.9


def test_dense_crf_rejects_bad_input():
    img = two_region_image()
    with pytest.raises(ValueError, match="uint8 RGB"):
        dense_crf(img.astype(np.float32), np.ones((2, 24, 32)))
    with pytest.raises(ValueError, match="probs must be"):
        dense_crf(img, np.ones((2, 10, 10)))
    with pytest.raises(ValueError, match="preset"):
        cam_crf(img, np.ones((1, 24, 32)), alpha=4, preset="nope")
