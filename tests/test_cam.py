"""CAM arithmetic (network/cam.py) against a straightforward re-implementation of the published
infer.py written here, on random feature maps (no network needed)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from network import cam as camlib

SIZE = (37, 50)                        # odd sizes catch off-by-one resizing errors
FEAT = [(5, 7), (10, 13), (14, 19), (19, 25)]   # one feature size per scale


def published(raws, size, label, head):
    """Literal published loop: raws = list of (raw (C' ,h,w), flipped)."""
    C = label.numel()
    total, total_bg = torch.zeros(C, *size), torch.zeros(size)
    for raw, flipped in raws:
        x = raw[None]
        if head == "eps":
            x = F.softmax(x, dim=1)
        up = F.interpolate(x, size, mode="bilinear", align_corners=False)[0]
        fg = up[:C] * label.view(C, 1, 1)
        bg = up[C] if head == "eps" else torch.zeros(size)
        if flipped:
            fg, bg = torch.flip(fg, [2]), torch.flip(bg, [1])
        total += fg
        total_bg += bg
    norm = total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)
    keys = [j for j in range(C) if label[j] > 1e-5]
    return keys, norm[keys], total_bg / len(raws)


def random_views(C, head, seed=0):
    g = torch.Generator().manual_seed(seed)
    ch = C if head == "cls" else C + 1
    pairs = []
    for h, w in FEAT:
        a = torch.randn(2, ch, h, w, generator=g) * 3
        if head == "cls":
            a = a.relu()
        pairs.append(a)
    return pairs


@pytest.mark.parametrize("head", ["cls", "eps"])
def test_fast_and_reference_paths_equal_published(head):
    C = 6
    label = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.float32)
    pairs = random_views(C, head)
    views = [(p[i], i == 1) for p in pairs for i in (0, 1)]
    keys_p, cams_p, bg_p = published(views, SIZE, label, head)

    # reference path of network/cam.py
    s, sb, n = camlib.combine_views_reference(views, SIZE, label, head)
    keys_r, cams_r, bg_r = camlib.finalize(s, sb, n, label)
    assert keys_r.tolist() == keys_p
    assert (cams_r - cams_p).abs().max() <= 1e-6

    # fast path: flip pairs summed at feature resolution, present classes only
    keys = camlib.present_classes(label)
    acc, acc_bg = 0, 0
    for p in pairs:
        fg, bg = camlib.combine_flip_pair(p, SIZE, keys, label, head)
        acc = acc + fg
        acc_bg = acc_bg + (bg if bg is not None else 0)
    keys_f, cams_f, bg_f = camlib.finalize(acc, acc_bg if head == "eps" else None, 8, label, keys=keys)
    assert keys_f.tolist() == keys_p
    assert cams_f.shape == (3, *SIZE)
    assert (cams_f - cams_p).abs().max() <= 1e-5
    if head == "eps":
        assert (bg_f - bg_p).abs().max() <= 1e-5
        assert (bg_r - bg_p).abs().max() <= 1e-6
    else:
        assert bg_f is None and bg_r is None
    m_f = camlib.pseudo_mask(keys_f, cams_f, thr=0.2)
    m_p = camlib.pseudo_mask(torch.tensor(keys_p), cams_p, thr=0.2)
    assert torch.equal(m_f, m_p)


def test_eps_softmax_is_taken_before_upsampling():
    raw = torch.randn(4, 3, 4) * 5          # C = 3, background last
    label = torch.ones(3)
    fg, bg = camlib.published_view_cam(raw, (9, 11), label, "eps", flipped=False)
    want = F.interpolate(torch.softmax(raw, 0)[None], (9, 11), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(fg, want[:3], atol=1e-6) and torch.allclose(bg, want[3], atol=1e-6)
    other = torch.softmax(F.interpolate(raw[None], (9, 11), mode="bilinear", align_corners=False)[0], 0)
    assert (other[:3] - fg).abs().max() > 1e-3   # the order matters, so the test is meaningful


def test_flipped_view_is_unflipped():
    # A view and the CAM of its mirror image must add up to twice the view itself.
    raw = torch.rand(2, 6, 8)
    label = torch.ones(2)
    a, _ = camlib.published_view_cam(raw, (12, 16), label, "cls", flipped=False)
    b, _ = camlib.published_view_cam(raw.flip(-1), (12, 16), label, "cls", flipped=True)
    assert torch.allclose(a, b, atol=1e-6)
    fg, _ = camlib.combine_flip_pair(torch.stack([raw, raw.flip(-1)]), (12, 16),
                                     torch.tensor([0, 1]), label, "cls")
    assert torch.allclose(fg, 2 * a, atol=1e-5)
    # An asymmetric map must not be symmetric after un-flipping (catches a missing flip).
    assert not torch.allclose(a, a.flip(-1))


def test_label_masking_and_keys():
    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    raw = torch.rand(4, 5, 5) + 0.1
    fg, _ = camlib.published_view_cam(raw, (10, 10), label, "cls", flipped=False)
    assert fg[0].abs().max() == 0 and fg[2].abs().max() == 0 and fg[1].min() > 0
    keys, cams, _ = camlib.finalize(fg, None, 1, label)
    assert keys.tolist() == [1, 3] and cams.shape == (2, 10, 10)
    assert camlib.present_classes(torch.tensor([1e-6, 2e-5, 0.0])).tolist() == [1]


def test_normalisation_adds_1e5_to_the_max():
    s = torch.tensor([[[0.0, 2.0], [1.0, 0.5]]])
    n = camlib.normalize_cams(s)
    assert torch.allclose(n, s / (2.0 + 1e-5))
    assert n.max() < 1.0


def test_pseudo_mask_threshold_ties_and_values():
    keys = torch.tensor([2, 7])
    cams = torch.tensor([[[0.1, 0.2, 0.5, 0.9]], [[0.15, 0.2, 0.6, 0.3]]])
    m = camlib.pseudo_mask(keys, cams, thr=0.2)
    # 0.1/0.15 < thr -> bg; tie 0.2/0.2/0.2 -> bg; 0.6 -> class 7 -> 8; 0.9 -> class 2 -> 3
    assert m.tolist() == [[0, 0, 8, 3]] and m.dtype == torch.uint8
    assert camlib.pseudo_mask(keys, cams, thr=0.05).tolist() == [[8, 3, 8, 3]]
    # numpy input works too (evaluate.py threshold sweeps read npz files)
    assert camlib.pseudo_mask(keys.numpy(), cams.numpy(), thr=0.2).tolist() == [[0, 0, 8, 3]]
    # background map instead of a constant
    bg = torch.tensor([[0.5, 0.1, 0.7, 0.95]])
    assert camlib.pseudo_mask(keys, cams, bg=bg).tolist() == [[0, 3, 0, 0]]  # class tie -> lower key
    # no class at all -> everything background
    assert camlib.pseudo_mask(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 3)).tolist() == [[0, 0, 0]]


def test_pseudo_mask_rejects_bad_shapes():
    with pytest.raises(ValueError):
        camlib.pseudo_mask(torch.tensor([0]), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError):
        camlib.view_probs(torch.zeros(1, 2, 2), "seg")


def test_upsample_matches_interpolate_and_commutes_with_flip():
    x = torch.rand(3, 7, 9)
    up = camlib.upsample(x, (20, 31))
    assert torch.allclose(up, F.interpolate(x[None], (20, 31), mode="bilinear", align_corners=False)[0])
    assert torch.allclose(camlib.upsample(x.flip(-1), (20, 31)), up.flip(-1), atol=1e-6)
    assert np.isfinite(up.numpy()).all()
