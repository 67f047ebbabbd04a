"""EPS loss and classification loss: hand-computed values on tiny tensors (EPS eps.py
get_eps_loss, module/train.py train_eps)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from network.losses import OVERLAP_EPS, cls_loss, eps_loss, overlap_ratio


def _cam_from_probs(probs):
    """Logits whose softmax over dim 1 is `probs` (float64, so the hand values hold to ~1e-15)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64))


# One image, C = 3 classes + background (last), 2x2 CAM. Per pixel (p0, p1, p2, p_bg):
#   class 0 (present) covers the two salient pixels  -> overlap ratio ~1 -> foreground
#   class 1 (present) covers a non-salient pixel      -> ratio 0          -> background
#   class 2 (absent)                                   -> in neither set
P = np.array([[[0.7, 0.7], [0.1, 0.1]],   # class 0
              [[0.1, 0.1], [0.7, 0.1]],   # class 1
              [[0.1, 0.1], [0.1, 0.1]],   # class 2 (absent)
              [[0.1, 0.1], [0.1, 0.7]]])  # background
LABELS = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
# Saliency at 4x4: nearest resizing to 2x2 samples pixels (0,0), (0,2), (2,0), (2,2); the other
# pixels hold values that would change the result if they were used.
SAL_4x4 = torch.tensor([[[[1.0, 0.3, 1.0, 0.3],
                          [0.3, 0.3, 0.3, 0.3],
                          [0.0, 0.3, 0.0, 0.3],
                          [0.3, 0.3, 0.3, 0.3]]]], dtype=torch.float64)


@pytest.mark.parametrize("lam, expected", [
    # fg = p0 = [.7,.7,.1,.1]; bg = p1 + p_bg = [.2,.2,.8,.8]; target [1,1,0,0]
    (0.5, (0.25 ** 2 * 2 + 0.15 ** 2 * 2) / 4),   # pred .5 fg + .5 (1 - bg) = [.75,.75,.15,.15]
    (1.0, (0.3 ** 2 * 2 + 0.1 ** 2 * 2) / 4),     # pred = fg
    (0.0, (0.2 ** 2 * 4) / 4),                    # pred = 1 - bg = [.8,.8,.2,.2]
])
def test_eps_loss_hand_values(lam, expected):
    cam = _cam_from_probs(P[None])
    loss, maps = eps_loss(cam, SAL_4x4, LABELS, tau=0.4, lam=lam, return_maps=True)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Class 0 passes tau, class 1 is present but fails (background), class 2 absent (neither).
    assert maps["fg_set"].tolist() == [[True, False, False, False]]
    assert maps["bg_set"].tolist() == [[False, True, False, True]]
    np.testing.assert_allclose(maps["ratio"][0].numpy(), [2 / (2 + 4 * OVERLAP_EPS), 0.0, 0.0])
    np.testing.assert_allclose(maps["fg"][0, 0].numpy(), P[0], atol=1e-12)
    np.testing.assert_allclose(maps["bg"][0, 0].numpy(), P[1] + P[3], atol=1e-12)
    np.testing.assert_allclose(maps["sal"][0, 0].numpy(), [[1, 1], [0, 0]])
    assert maps["sal_pred"].shape == (1, 1, 2, 2)


def test_tau_decides_between_fg_and_bg():
    cam = _cam_from_probs(P[None])
    # A tau above class 0's ratio (~0.9998) sends it to the background as well: fg is empty.
    _, maps = eps_loss(cam, SAL_4x4, LABELS, tau=0.99995, lam=0.5, return_maps=True)
    assert maps["fg_set"].tolist() == [[False, False, False, False]]
    assert maps["bg_set"].tolist() == [[True, True, False, True]]
    np.testing.assert_allclose(maps["fg"].numpy(), 0.0)


def test_absent_class_never_selected():
    # Class 2 gets the salient pixels, but it is not in the image label: it stays out of both
    # sets even though its overlap ratio is high.
    p = P.copy()
    p[[0, 2]] = p[[2, 0]]
    _, maps = eps_loss(_cam_from_probs(p[None]), SAL_4x4, LABELS, tau=0.4, lam=0.5, return_maps=True)
    assert maps["ratio"][0, 2] > 0.99
    assert not maps["fg_set"][0, 2] and not maps["bg_set"][0, 2]
    assert not maps["fg_set"][0, 0] and maps["bg_set"][0, 0]   # present class 0 now fails tau


def test_exact_half_rounds_to_zero():
    # C = 1: equal logits give probabilities of exactly 0.5. torch.round is half-to-even, so the
    # class mask is empty, the ratio is 0 and the present class goes to the background:
    # pred = lam * 0 + (1 - lam) * (1 - 1) = 0 against a saliency of 1 -> loss 1.
    # (Rounding half up would give fg = bg = 0.5, pred 0.5, loss 0.25.)
    cam = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    sal = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    loss, maps = eps_loss(cam, sal, torch.ones(1, 1, dtype=torch.float64), tau=0.4, lam=0.5,
                          return_maps=True)
    assert maps["ratio"].item() == 0.0
    assert loss.item() == pytest.approx(1.0)
    # The saliency is rounded the same way for the ratio: 0.5 counts as non-salient.
    cam = torch.tensor([[[[5.0]], [[-5.0]]]], dtype=torch.float64)
    _, maps = eps_loss(cam, torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64),
                       torch.ones(1, 1, dtype=torch.float64), tau=0.4, lam=0.5, return_maps=True)
    assert maps["ratio"].item() == 0.0


def test_epsilon_is_added_per_pixel():
    # 10x10 map, the class mask is one salient pixel: ratio = 1 / (1 + 1e-4 * 100) ~ 0.990.
    # With a single 1e-4 it would be ~0.9999, which passes tau = 0.995.
    masks = torch.zeros(1, 1, 10, 10)
    masks[0, 0, 3, 4] = 1
    sal = torch.ones(1, 1, 10, 10)
    assert overlap_ratio(masks, sal).item() == pytest.approx(1 / (1 + OVERLAP_EPS * 100), rel=1e-6)
    cam = torch.full((1, 2, 10, 10), -3.0, dtype=torch.float64)
    cam[0, 1] = 3.0
    cam[0, 0, 3, 4], cam[0, 1, 3, 4] = 3.0, -3.0
    _, maps = eps_loss(cam, sal.double(), torch.ones(1, 1, dtype=torch.float64), tau=0.995,
                       lam=0.5, return_maps=True)
    assert maps["ratio"].item() == pytest.approx(1 / 1.01)
    assert maps["bg_set"].tolist() == [[True, True]]


def test_target_is_unrounded_saliency():
    cam = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    cam[0, 0] = 4.0
    sal = torch.full((1, 1, 1, 1), 0.8, dtype=torch.float64)
    loss, maps = eps_loss(cam, sal, torch.ones(1, 1, dtype=torch.float64), tau=0.4, lam=1.0,
                          return_maps=True)
    p0 = 1 / (1 + math.exp(-4.0))
    assert loss.item() == pytest.approx((p0 - 0.8) ** 2)


def test_gradient_flows_only_through_softmax():
    # d loss / d p_c = 2/M (pred - s) w_c with w_c = lam [c in F] - (1 - lam) [c in B] (selection
    # masks are constants), chained through the softmax Jacobian p_k (g_k - sum_c g_c p_c).
    torch.manual_seed(0)
    n, c, h, w, lam = 2, 3, 4, 4, 0.3
    cam = torch.randn(n, c + 1, h, w, dtype=torch.float64, requires_grad=True)
    sal = (torch.rand(n, 1, 8, 8, dtype=torch.float64) > 0.5).double()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    loss, maps = eps_loss(cam, sal, labels, tau=0.2, lam=lam, return_maps=True)
    loss.backward()
    p = F.softmax(cam.detach(), 1)
    wts = lam * maps["fg_set"].double() - (1 - lam) * maps["bg_set"].double()
    g = 2.0 / (n * h * w) * (maps["sal_pred"] - maps["sal"]).detach() * wts[:, :, None, None]
    expected = p * (g - (g * p).sum(1, keepdim=True))
    torch.testing.assert_close(cam.grad, expected)
    for key in ("ratio", "fg_set", "bg_set"):
        assert not maps[key].requires_grad


def _reference_numpy(cam, sal, labels, tau, lam):
    """Loop-by-loop transcription of EPS eps.py get_eps_loss (nearest = pixel floor(i * H / h))."""
    n, c1, h, w = cam.shape
    hh, ww = sal.shape[2:]
    s = sal[:, 0][:, (np.arange(h) * hh) // h][:, :, (np.arange(w) * ww) // w]
    e = np.exp(cam - cam.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    total = 0.0
    for i in range(n):
        fg = np.zeros((h, w))
        bg = p[i, c1 - 1].copy()
        for c in range(c1 - 1):
            if not labels[i, c]:
                continue
            m = np.round(p[i, c])
            r = (m * np.round(s[i])).sum() / (m + 1e-4).sum()
            if r > tau:
                fg += p[i, c]
            else:
                bg += p[i, c]
        pred = lam * fg + (1 - lam) * (1 - bg)
        total += ((pred - s[i]) ** 2).sum()
    return total / (n * h * w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    cam = rng.normal(scale=3.0, size=(3, 6, 7, 7))
    sal = rng.random((3, 1, 56, 56))
    labels = (rng.random((3, 5)) > 0.5).astype(np.float64)
    got = eps_loss(torch.from_numpy(cam), torch.from_numpy(sal), torch.from_numpy(labels), 0.3, 0.7)
    assert got.item() == pytest.approx(_reference_numpy(cam, sal, labels, 0.3, 0.7), rel=1e-10)


def test_float32_and_half_inputs():
    torch.manual_seed(0)
    cam = torch.randn(2, 4, 5, 5)
    sal = torch.rand(2, 1, 40, 40)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    ref = eps_loss(cam.double(), sal.double(), labels.double(), 0.4, 0.5)
    assert eps_loss(cam, sal, labels, 0.4, 0.5).dtype == torch.float32
    assert eps_loss(cam, sal, labels, 0.4, 0.5).item() == pytest.approx(ref.item(), rel=1e-5)
    # bf16 CAMs (autocast) are upcast; the loss stays float32.
    assert eps_loss(cam.bfloat16(), sal, labels, 0.4, 0.5).dtype == torch.float32


def test_label_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="C classes"):
        eps_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 4), 0.4, 0.5)


def test_cls_loss_is_multilabel_soft_margin():
    x = torch.tensor([[2.0, -1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    ls = lambda v: -math.log1p(math.exp(-v))  # log sigmoid
    expected = -(ls(2.0) + ls(1.0) + ls(0.0)) / 3
    assert cls_loss(x, y).item() == pytest.approx(expected, rel=1e-6)
