"""DeepLab-v2 model, weight loading, transforms and CRF of the segmentation stage
(deeplab-pytorch; docs/segmentation.md).

The ResNet-101 is built on the meta device (shapes only), so the layout tests cost no memory.
"""
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data.seg_transforms import (MEAN_BGR, SegEvalTransform, SegTrainTransform, pad_to,
                                 resize_pair, rgb_to_bgr_float, scaled_size)
from network.deeplab import (SEG_ARCHS, SegWeightsError, build_deeplab, detect_init_kind,
                             infer_arch, load_init_state_dict, load_init_weights, load_trained,
                             msc_max, torchvision_to_deeplab)
from train_seg import resize_labels, seg_loss, step_poly_lr

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def r101():
    with torch.device("meta"):
        return build_deeplab("deeplabv2_resnet101", 21)


# ------------------------------------------------------------------------------------------
# State-dict layout against deeplab-pytorch's DeepLabV2_ResNet101_MSC key names

KEY_PATTERNS = [
    r"base\.layer1\.conv1\.conv\.weight",
    r"base\.layer1\.conv1\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"base\.layer[2-5]\.block\d+\.(reduce|conv3x3|increase|shortcut)\.conv\.weight",
    r"base\.layer[2-5]\.block\d+\.(reduce|conv3x3|increase|shortcut)\.bn\."
    r"(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"base\.aspp\.c[0-3]\.(weight|bias)",
]


def test_resnet101_key_names_and_counts(r101):
    sd = r101.state_dict()
    for k in sd:
        assert any(re.fullmatch(p, k) for p in KEY_PATTERNS), k
    # 1 stem + 33 bottlenecks x 3 + 4 shortcuts = 104 conv/BN pairs (6 entries each) + 8 ASPP
    assert len(sd) == 104 * 6 + 8 == 632
    assert sum(not k.endswith("num_batches_tracked") for k in sd) == 528
    blocks = Counter(re.match(r"base\.(layer\d)\.(block\d+)\.", k).groups()
                     for k in sd if ".block" in k)
    per_layer = Counter(layer for layer, _ in blocks)
    assert dict(per_layer) == {"layer2": 3, "layer3": 4, "layer4": 23, "layer5": 3}
    shortcuts = {re.match(r"base\.(layer\d\.block\d+)\.shortcut", k).group(1)
                 for k in sd if ".shortcut." in k}
    assert shortcuts == {"layer2.block1", "layer3.block1", "layer4.block1", "layer5.block1"}
    assert sorted(k for k in sd if "aspp" in k) == sorted(
        f"base.aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias"))


def test_resnet101_shapes_and_hyperparameters(r101):
    sd = r101.state_dict()
    assert sd["base.layer1.conv1.conv.weight"].shape == (64, 3, 7, 7)
    assert sd["base.layer2.block1.reduce.conv.weight"].shape == (64, 64, 1, 1)
    assert sd["base.layer2.block1.shortcut.conv.weight"].shape == (256, 64, 1, 1)
    assert sd["base.layer3.block1.reduce.conv.weight"].shape == (128, 256, 1, 1)
    assert sd["base.layer4.block23.conv3x3.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["base.layer5.block3.increase.conv.weight"].shape == (2048, 512, 1, 1)
    assert sd["base.aspp.c3.weight"].shape == (21, 2048, 3, 3)
    assert sd["base.aspp.c3.bias"].shape == (21,)
    b = r101.base
    assert b.layer1.pool.ceil_mode and b.layer1.pool.kernel_size == 3
    # stride in the first 1x1 (MSRA), output stride 8 through dilation 2 / 4
    assert b.layer3.block1.reduce.conv.stride == (2, 2)
    assert b.layer3.block1.conv3x3.conv.stride == (1, 1)
    assert b.layer4.block1.reduce.conv.stride == (1, 1)
    assert b.layer4.block5.conv3x3.conv.dilation == (2, 2)
    assert b.layer5.block2.conv3x3.conv.dilation == (4, 4)
    assert [(c.dilation, c.padding) for c in b.aspp.children()] == [
        ((r, r), (r, r)) for r in (6, 12, 18, 24)]
    bns = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 104 and all(m.momentum == 0.001 and m.eps == 1e-5 for m in bns)
    assert not any(isinstance(m, nn.ReLU) for m in b.layer2.block1.increase)  # no ReLU before +


def test_parameter_groups_published(r101):
    groups = {g["name"]: g for g in r101.get_parameter_groups()}
    assert list(groups) == ["1x", "10x", "20x"]
    assert len(groups["1x"]["params"]) == 104  # every backbone conv weight, no BN parameter
    assert [len(groups[k]["params"]) for k in ("10x", "20x")] == [4, 4]
    assert [(groups[k]["lr_mult"], groups[k]["weight_decay_mult"]) for k in groups] == [
        (1, 1), (10, 1), (20, 0)]
    assert all(p.dim() == 1 for p in groups["20x"]["params"])
    bn_params = {id(p) for m in r101.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert not bn_params & {id(p) for g in groups.values() for p in g["params"]}


def test_small_variant_has_bn_group():
    net = build_deeplab("deeplabv2_small", 6)
    names = [g["name"] for g in net.get_parameter_groups()]
    assert names == ["1x", "10x", "20x", "bn"]
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for g in net.get_parameter_groups() for p in g["params"])


# ------------------------------------------------------------------------------------------
# MSC and frozen BN

def test_output_sizes_os8():
    net = build_deeplab("deeplabv2_small", 21).train()
    outs = net(torch.randn(1, 3, 321, 321))
    assert [tuple(o.shape[-2:]) for o in outs] == [(41, 41), (21, 21), (31, 31), (41, 41)]
    net.eval()
    assert net(torch.randn(1, 3, 321, 321)).shape == (1, 21, 41, 41)


def test_msc_max_is_pixelwise_max_of_resized_outputs():
    torch.manual_seed(0)
    l1, l5, l75 = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 5, 5), torch.randn(2, 3, 7, 7)
    up = lambda t: F.interpolate(t, size=(9, 9), mode="bilinear", align_corners=False)  # noqa: E731
    ref = torch.stack([l1, up(l5), up(l75)]).max(0).values
    assert torch.equal(msc_max(l1, [l5, l75]), ref)


def test_msc_train_and_eval_outputs_agree():
    torch.manual_seed(0)
    net = build_deeplab("deeplabv2_small", 5, freeze_bn=True)
    x = torch.randn(2, 3, 65, 81)
    net.train()
    l1, l05, l075, lmax = net(x)
    # the pyramid inputs are floor(65*s) x floor(81*s) and run through the same base
    assert l05.shape == net.base(F.interpolate(x, scale_factor=0.5, mode="bilinear")).shape
    assert torch.allclose(lmax, msc_max(l1, [l05, l075]))
    assert torch.all(lmax >= l1)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), lmax, atol=1e-6)


def test_frozen_bn_stays_frozen():
    net = build_deeplab("deeplabv2_small", 5, freeze_bn=True).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns]
    net(torch.randn(2, 3, 40, 40) * 10)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert all(m.num_batches_tracked == 0 for m in bns)


# ------------------------------------------------------------------------------------------
# Initialisation: deeplab-pytorch COCO init and torchvision ImageNet ResNet-101

def coco_like(model, n_fc=91):
    """A deeplabv1_resnet101-coco.pth-shaped dict: backbone keys without "base.", fc [91,2048,1,1]."""
    sd = {k: v.clone() for k, v in model.base.state_dict().items() if not k.startswith("aspp.")}
    c = model.base.aspp.c0.in_channels
    sd["fc.weight"] = torch.randn(n_fc, c, 1, 1, device=sd["layer1.conv1.conv.weight"].device)
    sd["fc.bias"] = torch.zeros(n_fc, device=sd["fc.weight"].device)
    return sd


def test_coco_init_resnet101_exact_sets(r101):
    sd = coco_like(r101)
    assert len(sd) == 626 and detect_init_kind(sd) == "deeplab"
    rep = load_init_state_dict(r101, sd)
    assert rep["kind"] == "deeplab" and rep["loaded"] == 624
    assert rep["new"] == sorted(f"aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert rep["dropped"] == ["fc.bias", "fc.weight"]


def test_coco_init_file_loads_values(tmp_path):
    torch.manual_seed(0)
    src = build_deeplab("deeplabv2_small", 21)
    for p in src.parameters():
        p.data.normal_()
    path = tmp_path / "coco.pth"
    torch.save(coco_like(src), path)
    dst = build_deeplab("deeplabv2_small", 21)
    aspp_before = dst.base.aspp.c0.weight.clone()
    load_init_weights(dst, path)
    assert torch.equal(dst.base.layer5.block1.conv3x3.conv.weight,
                       src.base.layer5.block1.conv3x3.conv.weight)
    assert torch.equal(dst.base.aspp.c0.weight, aspp_before)  # ASPP stays new
    # a file missing a backbone key is refused, naming the key
    bad = coco_like(src)
    del bad["layer3.block1.reduce.conv.weight"]
    torch.save(bad, path)
    with pytest.raises(SegWeightsError, match="layer3.block1.reduce.conv.weight"):
        load_init_weights(build_deeplab("deeplabv2_small", 21), path)
    with pytest.raises(SegWeightsError, match="not found"):
        load_init_weights(dst, tmp_path / "nope.pth")


def test_torchvision_resnet101_maps_onto_every_backbone_key(r101):
    import torchvision
    with torch.device("meta"):
        tv = torchvision.models.resnet101().state_dict()
    mapped, dropped = torchvision_to_deeplab(tv)
    assert dropped == ["fc.bias", "fc.weight"]
    own = r101.base.state_dict()
    assert set(mapped) == {k for k in own if not k.startswith("aspp.")}
    assert all(mapped[k].shape == own[k].shape for k in mapped)
    rep = load_init_state_dict(r101, tv)
    assert rep["kind"] == "torchvision" and rep["loaded"] == 624 and len(rep["new"]) == 8


def test_torchvision_first_conv_folds_rgb_normalisation():
    # conv_tv((rgb/255 - mean)/std) == conv_ours(bgr - caffe_mean) up to the mean difference
    torch.manual_seed(0)
    w = torch.randn(4, 3, 7, 7)
    mapped, _ = torchvision_to_deeplab({"conv1.weight": w})
    w2 = mapped["layer1.conv1.conv.weight"]
    rgb = torch.rand(1, 3, 16, 16) * 255
    tv_mean, tv_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x_tv = (rgb / 255 - tv_mean.view(1, 3, 1, 1)) / tv_std.view(1, 3, 1, 1)
    # our input uses the ImageNet mean here, to isolate the channel order / scale fold
    x_ours = rgb.flip(1) - (tv_mean * 255).flip(0).view(1, 3, 1, 1)
    assert torch.allclose(F.conv2d(x_tv, w), F.conv2d(x_ours, w2), atol=1e-3)


def test_infer_arch_and_load_trained(tmp_path, r101):
    assert infer_arch(r101.state_dict()) == ("deeplabv2_resnet101", 21)
    net = build_deeplab("deeplabv2_small", 6)
    path = tmp_path / "final.pth"
    torch.save(net.state_dict(), path)
    back = load_trained(path)
    assert back.arch == "deeplabv2_small" and back.n_classes == 6
    torch.save({"model": net.state_dict(), "iter": 3}, path)  # resume checkpoint layout
    assert load_trained(path).n_classes == 6
    torch.save({"fc.weight": torch.zeros(2)}, path)
    with pytest.raises(SegWeightsError, match="checkpoint_final"):
        load_trained(path)


def test_registry():
    assert set(SEG_ARCHS) == {"deeplabv2_resnet101", "deeplabv2_small"}
    with pytest.raises(ValueError, match="choose one of"):
        build_deeplab("deeplabv3", 21)


# ------------------------------------------------------------------------------------------
# Transforms (deeplab-pytorch VOC augmentation)

class FixedRng:
    """random-module stand-in: fixed scale, crop offsets and flip decision."""

    def __init__(self, scale, y=0, x=0, flip=False):
        self.scale, self.offsets, self.flip = scale, [y, x], flip

    def choice(self, seq):
        assert self.scale in seq
        return self.scale

    def randint(self, a, b):
        v = self.offsets.pop(0)
        assert a <= v <= b
        return v

    def random(self):
        return 0.0 if self.flip else 0.9


def test_scaled_size_truncates():
    assert scaled_size(375, 500, 0.75) == (281, 375)
    assert scaled_size(375, 500, 1.25) == (468, 625)


def test_train_transform_pads_bottom_right_with_mean_and_ignore():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    mask = np.ones((20, 30), np.uint8)
    t = SegTrainTransform(crop_size=32, rng=FixedRng(1.0))
    img, lab = t(rgb, mask)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    assert lab.shape == (32, 32) and lab.dtype == np.int64
    # BGR order minus the Caffe mean; red is channel 2
    assert np.allclose(img[:, 0, 0], [0 - MEAN_BGR[0], 0 - MEAN_BGR[1], 200 - MEAN_BGR[2]])
    assert np.all(img[:, 20:, :] == 0) and np.all(img[:, :, 30:] == 0)  # mean padding -> 0
    assert np.all(lab[20:, :] == 255) and np.all(lab[:, 30:] == 255)
    assert np.all(lab[:20, :30] == 1)


def test_train_transform_scale_crop_flip():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (40, 50), dtype=np.uint8)
    img, lab = SegTrainTransform(crop_size=24, rng=FixedRng(1.5, y=3, x=7, flip=True))(rgb, mask)
    big_img, big_lab = resize_pair(rgb_to_bgr_float(rgb), mask, 1.5)
    assert big_lab.shape == (60, 75)
    exp_lab = big_lab[3:27, 7:31][:, ::-1]
    exp_img = (big_img[3:27, 7:31][:, ::-1] - np.float32(MEAN_BGR)).transpose(2, 0, 1)
    assert np.array_equal(lab, exp_lab) and np.allclose(img, exp_img)
    # the label is resized with PIL NEAREST, the image with cv2 linear
    assert np.array_equal(big_lab, np.asarray(Image.fromarray(mask).resize((75, 60), Image.NEAREST)))


def test_train_transform_uses_the_discrete_scale_set():
    seen = set()
    t = SegTrainTransform(crop_size=8, rng=random.Random(0))
    orig = t.rng.choice

    def spy(seq):
        v = orig(seq)
        seen.add(v)
        return v
    t.rng.choice = spy
    for _ in range(60):
        t(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8))
    assert seen == {0.5, 0.75, 1.0, 1.25, 1.5}


def test_eval_transform_full_image():
    rgb = np.full((7, 9, 3), 100, np.uint8)
    img, lab = SegEvalTransform()(rgb, np.zeros((7, 9), np.uint8))
    assert img.shape == (3, 7, 9) and np.allclose(img[:, 0, 0], 100 - np.float32(MEAN_BGR))


def test_pad_noop_when_large_enough():
    img, lab = pad_to(np.zeros((5, 5, 3), np.float32), np.zeros((5, 5), np.uint8), 4)
    assert img.shape == (5, 5, 3)


# ------------------------------------------------------------------------------------------
# Loss, label resizing, lr schedule

@pytest.mark.parametrize("src,dst", [((321, 321), (41, 41)), ((321, 321), (21, 21)),
                                     ((321, 321), (31, 31)), ((50, 70), (13, 9))])
def test_resize_labels_matches_pil_nearest(src, dst):
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 21, (2,) + src).astype(np.int64)
    lab[0, :5] = 255
    ours = resize_labels(torch.from_numpy(lab), dst).numpy()
    pil = np.stack([np.asarray(Image.fromarray(x.astype(np.float32)).resize(dst[::-1], Image.NEAREST))
                    for x in lab])
    assert np.array_equal(ours, pil)


def test_seg_loss_sums_terms_and_handles_all_ignored():
    torch.manual_seed(0)
    outs = [torch.randn(2, 4, s, s) for s in (11, 6, 8, 11)]
    labels = torch.randint(0, 4, (2, 81, 81))
    total, terms = seg_loss(outs, labels)
    ref = sum(F.cross_entropy(o, resize_labels(labels, o.shape[-2:]), ignore_index=255) for o in outs)
    assert torch.allclose(total, ref) and len(terms) == 4
    total, _ = seg_loss(outs, torch.full((2, 81, 81), 255))
    assert float(total) == 0.0


def test_step_poly_lr_updates_every_10_iterations():
    base = 2.5e-4
    assert all(step_poly_lr(i, base, 20000, 0.9, 10) == base for i in range(10))
    v = base * (1 - 10 / 20000) ** 0.9
    assert all(step_poly_lr(i, base, 20000, 0.9, 10) == pytest.approx(v) for i in range(10, 20))
    assert step_poly_lr(19999, base, 20000, 0.9, 10) == pytest.approx(base * (10 / 20000) ** 0.9)


# ------------------------------------------------------------------------------------------
# CRF (utils/crf.py, DeepLab parameters)

def test_crf_image_modes():
    from infer_seg import crf_input_image
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (130, 120, 110)
    assert np.array_equal(crf_input_image(rgb, "rgb"), rgb)
    bug = crf_input_image(rgb, "published")
    # black: BGR - mean = (-104.008, -116.669, -122.675) -> trunc -> wrap
    assert bug[1, 1].tolist() == [256 - 104, 256 - 116, 256 - 122]
    assert bug[0, 0].tolist() == [5, 3, 7]  # 110-104.008, 120-116.669, 130-122.675 truncated
    with pytest.raises(ValueError):
        crf_input_image(rgb, "bgr")


def test_crf_on_small_image_follows_edges():
    pytest.importorskip("pydensecrf")
    from infer_seg import crf_labels
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, 16:] = 255  # left dark, right bright
    truth = (np.arange(32)[None].repeat(32, 0) >= 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    probs = np.where(truth[None] == np.arange(2)[:, None, None], 0.65, 0.35).astype(np.float32)
    flip = rng.random((32, 32)) < 0.15  # noisy unary
    probs[:, flip] = probs[::-1, flip]
    noisy = probs.argmax(0)
    out = crf_labels(rgb, probs, "rgb")
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert (out == truth).mean() > (noisy == truth).mean()
    assert (out == truth).mean() > 0.98
