"""Extending the method from outside the package: docs/extending.md, run as a test.

A toy method (``ToyHead``: C+1 maps, its own loss, flag and non-linearity) and a toy backbone
(``TwoConv``) are defined in this file, registered with ``network.registry``, and taken through
the real entry points: ``train.main`` -> ``infer.main`` on the checkpoint it wrote (identified
from the network record) -> ``evaluate.main`` on the pseudo-masks. If adding a method needs more
than a file like this one, these tests fail first.

The registrations live only as long as the module fixture (``registered``), so no other test
sees them. Also here: the registry's unregister helpers, and the rule that nothing outside
network/ compares method names (the head's attributes decide instead)."""
import argparse
import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import evaluate
import infer
import train
from data.registry import get_dataset
from network import registry
from network.base import Backbone
from network.heads import EpsHead, Head, HParam
from network.losses import cls_loss
from network.registry import build_network, register_backbone, register_head, registered
from network.weights import identify_checkpoint, load_pretrained, network_record
from tools import make_demo_dataset as demo

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# 1. a method: one head, its loss, its flag
# ------------------------------------------------------------------------------------------------
def agreement_loss(cam: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the foreground the head predicts (1 - sigmoid of the
    background map, the last one) and the saliency map, at CAM resolution."""
    sal = F.interpolate(saliency.float(), size=cam.shape[-2:], mode="nearest")
    return F.mse_loss(1 - torch.sigmoid(cam[:, -1:].float()), sal)


class ToyHead(Head):
    """C class maps + a background map (last), like EPS; sigmoid maps at inference; trained with
    the multilabel soft-margin loss plus ``--toy-weight`` x the saliency agreement."""

    name = "toy"                 # networks <backbone>_toy
    needs_saliency = True        # batches carry saliency maps
    has_background = True        # cam_probs: C class maps, then the background map
    hparams = {"toy_weight": HParam(default=0.5, low=0, help="toy method: weight of the "
                                    "saliency-agreement loss (>= 0)")}  # --toy-weight
    classifier_key = "classifier.weight"  # not fc8: C of an unrecorded file is read from here

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(num_classes, **backbone_kwargs)  # builds the trunk
        self.classifier = nn.Conv2d(self.feature_channels, self.out_channels(num_classes), 1,
                                    bias=False)
        self.from_scratch_layers = [self.classifier]      # the 10x learning-rate group
        self.train()                                      # the backbone's freezing, now

    @classmethod
    def out_channels(cls, num_classes: int) -> int:
        return num_classes + 1

    def forward(self, x):
        cam = self.forward_cam(x)
        return cam.mean(dim=(2, 3)), cam

    def forward_cam(self, x):
        return self.classifier(self.forward_features(x))

    @staticmethod
    def cam_probs(raw):
        return torch.sigmoid(raw)

    def losses(self, out, labels, saliency=None, *, toy_weight: float, **hparams):
        pred, cam = out
        return {"cls": cls_loss(pred[:, :-1].float(), labels),
                "agree": toy_weight * agreement_loss(cam, saliency)}


# ------------------------------------------------------------------------------------------------
# 1b. a built-in method extended by subclassing: EPS + one loss term, with both hooks
# ------------------------------------------------------------------------------------------------
class EpsConsistency(EpsHead):
    """EPS plus a cross-view consistency term: the class scores of the image should match those
    an exponential moving average (EMA) of the classifier gives on a second augmented view.
    ``sample_extras`` adds the second view to each sample; ``around_step`` updates the EMA after
    each optimizer step. Inherits --tau / --lam (and their per-dataset values) from EpsHead."""

    name = "epscons"             # networks <backbone>_epscons
    hparams = {                  # only what this head adds: tau and lam are inherited
        "cons_weight": HParam(default=0.1, per_dataset={"voc12": 0.1, "coco": 0.05}, low=0,
                              help="weight of the cross-view consistency term (>= 0)"),
        "ema": HParam(default=0.99, low=0, high=1,
                      help="momentum of the EMA classifier, in [0, 1]"),
    }

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)  # --tau, --lam (EpsHead's), --cons-weight, --ema: each once
        # declared again with a second spelling: that spelling becomes a hidden alias
        parser.add_argument("--cons-weight", "--lambda-cons", dest="cons_weight", type=float)

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(num_classes, **backbone_kwargs)  # the EPS head: the trunk, then fc8
        # The hook's state is a buffer: in the state dict, so checkpoint_last.pth keeps it
        # and --resume restores it exactly (and checkpoint_cls.pth carries it).
        self.register_buffer("fc8_ema", self.fc8.weight.detach().clone())

    @staticmethod
    def sample_extras(ctx):
        """Runs in the loader workers: a second augmented view of the same image."""
        image, _saliency = ctx.view()
        return {"view": image}

    def losses(self, out, labels, saliency=None, *, extras, cons_weight: float, **hparams):
        terms = super().losses(out, labels, saliency, **hparams)  # EPS: cls + sal (tau, lam)
        with torch.no_grad():  # the teacher: the EMA classifier on the second view
            teacher = F.conv2d(self.forward_features(extras["view"]), self.fc8_ema)
        pred, _ = out
        terms["cons"] = cons_weight * F.mse_loss(torch.sigmoid(pred[:, :-1].float()),
                                                 torch.sigmoid(teacher.mean(dim=(2, 3))[:, :-1]))
        return terms

    def around_step(self, step, iteration: int, *, ema: float, **hparams):
        step()  # the optimizer step (and the fp16 scaler update)
        with torch.no_grad():
            self.fc8_ema.mul_(ema).add_(self.fc8.weight.detach(), alpha=1 - ema)


# ------------------------------------------------------------------------------------------------
# 2. a backbone: one trunk
# ------------------------------------------------------------------------------------------------
class TwoConv(Backbone):
    """Two 3x3 convolutions, output stride 8, trained from scratch."""

    arch = "twoconv"
    feature_channels = 32        # channels of conv6, what the heads build on
    default_freeze_bn = False    # from scratch: BN trains, nothing is frozen
    expects_pretrained = False   # train.py needs no --weights

    def __init__(self, *, freeze_bn: bool = False, checkpointing: bool = False):
        super().__init__(freeze_bn=freeze_bn, checkpointing=checkpointing)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, self.feature_channels, 3, stride=4, padding=1)

    def forward_as_dict(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return {"conv6": F.relu(self.conv2(x))}


@pytest.fixture(scope="module")
def toys():
    """ToyHead, EpsConsistency and TwoConv registered for this module only (small_toy,
    small_epscons, twoconv_cls, ...)."""
    with registered(heads=[ToyHead, EpsConsistency], backbones={"twoconv": TwoConv}):
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """12 generated images in the VOC layout, with saliency maps and ground truth."""
    root = tmp_path_factory.mktemp("extending") / "data"
    return demo.write_dataset(root, num_train=12, num_val=0, seed=0,
                              settings=demo.Settings(size=48), progress=False)


# ------------------------------------------------------------------------------------------------
# the walk-through: train -> infer -> evaluate through the entry points
# ------------------------------------------------------------------------------------------------
def parse(module, argv):
    """The entry point's parser, built now (so it sees the registered head's flags)."""
    return argparse.ArgumentParser(parents=[module.get_args_parser()],
                                   allow_abbrev=False).parse_args([str(a) for a in argv])


@pytest.mark.parametrize("network,terms", [("small_toy", ("cls", "agree")),
                                           ("small_epscons", ("cls", "sal", "cons")),
                                           ("twoconv_cls", ("cls",))])
def test_train_infer_evaluate(toys, data_root, tmp_path, network, terms):
    # train.py: the head's flag (every head's flags are on the command line), its loss terms
    # logged as loss_<term>, the network recorded in the checkpoint
    run_dir = train.main(parse(train, [
        "--dataset", "custom", "--data_root", data_root, "--train_list", "train",
        "--network", network, "--toy-weight", 0.3, "--crop_size", 32, "--resize_size", 32, 48,
        "--batch_size", 4, "--max_iters", 3, "--lr", 0.01, "--num_workers", 0,
        "--log-every", 1, "--save_root", tmp_path / "runs", "--session", network,
        "--device", "cpu"]))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert sorted(k for k in r if k.startswith("loss_")) == sorted(f"loss_{t}" for t in terms)
        assert all(np.isfinite(r[f"loss_{t}"]) and r[f"loss_{t}"] >= 0 for t in terms)
        assert r["loss"] == pytest.approx(sum(r[f"loss_{t}"] for t in terms))
    assert json.loads((run_dir / "args.json").read_text())["toy_weight"] == 0.3
    if network == "small_epscons":  # its own default for a custom dataset, EPS's inherited ones
        recorded = json.loads((run_dir / "args.json").read_text())
        assert (recorded["cons_weight"], recorded["tau"], recorded["lam"]) == (0.1, 0.4, 0.5)
    checkpoint = run_dir / train.FINAL_NAME
    record = network_record(torch.load(checkpoint, map_location="cpu", weights_only=True))
    assert (record["network"], record["num_classes"]) == (network, 5)

    # infer.py: no --network; the record says which network the file holds
    out = tmp_path / "out"
    args = parse(infer, ["--dataset", "custom", "--img_root", data_root, "--infer_list", "train",
                         "--weights", checkpoint, "--png-dir", out / "png", "--cam-dir",
                         out / "cam", "--save-bg", "--num-workers", 0, "--writer-threads", 1,
                         "--device", "cpu"])
    infer.main(args)
    assert args.network == network
    head = registry.get_head(network)
    info = get_dataset("custom", data_root=data_root)
    ids = info.read_ids("train")
    for i in ids:
        keys = np.flatnonzero(info.labels_for(i)).tolist()
        with np.load(out / "cam" / f"{i}.npz") as z:
            assert z["keys"].tolist() == keys
            assert z["cams"].shape == (len(keys), 48, 48) and np.isfinite(z["cams"]).all()
            assert ("bg" in z) == head.has_background  # the head's background map, if any
        mask = np.array(Image.open(out / "png" / f"{i}.png"))
        assert set(np.unique(mask)) <= {0} | {k + 1 for k in keys}
    # the CPU inference graph built for the new network: no fallback to the eager one
    log = (out / "png" / "log.txt").read_text()
    assert "inference model on cpu: folded" in log and "could not build" not in log

    # evaluate.py: pseudo-masks against the ground truth, and the CAMs over thresholds
    scores = evaluate.main(parse(evaluate, ["--dataset", "custom", "--datalist", "train",
                                            "--data-root", data_root, "--pred_dir", out / "png",
                                            "--num-workers", 0, "--no-progress"]))
    assert scores["num_images"] == len(ids) and 0 <= scores["miou"] <= 1
    sweep = evaluate.main(parse(evaluate, ["--dataset", "custom", "--datalist", "train",
                                           "--data-root", data_root, "--cam-dir", out / "cam",
                                           "--thresholds", 0.2, 0.4, "--num-workers", 0,
                                           "--no-progress"]))
    assert sweep["num_images"] == len(ids) and all(0 <= m <= 1 for m in sweep["miou_curve"])


def train_argv(data_root, save_root, network, session, iters=4, *extra):
    return [str(a) for a in [
        "--dataset", "custom", "--data-root", data_root, "--train-list", "train", "--network",
        network, "--crop-size", 32, "--resize-size", 32, 48, "--batch-size", 4, "--max-iters",
        iters, "--num-workers", 0, "--log-every", 1, "--ckpt-every", 2, "--save-root", save_root,
        "--session", session, "--device", "cpu", *extra]]


def test_a_subclass_of_eps_inherits_its_flags_and_recipe(toys, data_root):
    """EpsConsistency declares only its own hyper-parameters: --tau and --lam stay one flag each,
    with EPS's per-dataset values; its own cons_weight has its own per-dataset values."""
    import re

    listing = re.findall(r"^  (--[\w-]+)", train.get_args_parser().format_help(), flags=re.M)
    assert listing.count("--tau") == 1 and listing.count("--lam") == 1
    assert "--cons-weight" in listing and "--ema" in listing
    # its add_args called super().add_args and added an alias: each flag is still declared once
    assert listing.count("--cons-weight") == 1 and "--lambda-cons" not in listing
    args = parse(train, ["--data-root", "x", "--network", "small_epscons", "--lambda-cons", "0.3"])
    assert args.cons_weight == 0.3
    assert list(EpsConsistency.hparams) == ["tau", "lam", "cons_weight", "ema"]
    for dataset, (tau, lam, cons) in {"voc12": (0.4, 0.5, 0.1), "coco": (0.4, 0.9, 0.05),
                                      "custom": (0.4, 0.5, 0.1)}.items():
        args = train.resolve_args(parse(train, ["--data-root", "x", "--network", "small_epscons",
                                                "--dataset", dataset]),
                                   get_dataset(dataset, data_root=data_root), 1)
        assert (args.tau, args.lam, args.cons_weight, args.ema) == (tau, lam, cons, 0.99)
    bad = parse(train, ["--data-root", "x", "--network", "small_epscons", "--lam", "2"])
    with pytest.raises(train.TrainingError, match=r"--lam must be in \[0, 1\]"):
        train.resolve_args(bad, get_dataset("voc12"), 1)  # the inherited range check


def test_hook_state_resumes_exactly(toys, data_root, tmp_path):
    """The EMA buffer the around_step hook keeps is in the state dict: a run stopped after 3
    steps and resumed ends bitwise equal to an uninterrupted one, EMA included."""
    full = train.main(parse(train, train_argv(data_root, tmp_path, "small_epscons", "full", 5)))
    part = train_argv(data_root, tmp_path, "small_epscons", "part", 5)
    train.main(parse(train, part + ["--stop-after", "3"]))
    train.main(parse(train, part + ["--resume"]))
    a = torch.load(full / train.FINAL_NAME, weights_only=True)
    b = torch.load(tmp_path / "part" / train.FINAL_NAME, weights_only=True)
    assert a.keys() == b.keys() and "fc8_ema" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc8_ema"], a["fc8.weight"])  # the hook ran


def test_around_step_runs_after_every_optimizer_step(toys, data_root, tmp_path):
    """With --ema 0 the hook copies fc8 into the EMA after each step: equal at the end only if
    train.py called around_step around the last optimizer step (an untouched EMA keeps fc8's
    initial weights)."""
    run = train.main(parse(train, train_argv(data_root, tmp_path, "small_epscons", "ema0", 3)
                           + ["--ema", "0"]))
    sd = torch.load(run / train.FINAL_NAME, weights_only=True)
    assert torch.equal(sd["fc8_ema"], sd["fc8.weight"])


def test_sample_extras_are_the_same_in_loader_workers(toys, data_root, tmp_path):
    """The second view is drawn in the sample's own seeded stream (utils/sampler.py): 0 or 2
    loader processes give the same batches, so the same run."""
    a = train.main(parse(train, train_argv(data_root, tmp_path, "small_epscons", "w0", 2)))
    b = train.main(parse(train, train_argv(data_root, tmp_path, "small_epscons", "w2", 2)
                         + ["--num-workers", "2"]))
    sa = torch.load(a / train.FINAL_NAME, weights_only=True)
    sb = torch.load(b / train.FINAL_NAME, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


class EpsNoHooks(EpsHead):
    """EPS with both hooks doing nothing: sample_extras adds nothing, around_step only steps."""

    name = "epsnohooks"

    @staticmethod
    def sample_extras(ctx):
        return {}

    def around_step(self, step, iteration, **hparams):
        step()

    def losses(self, out, labels, saliency=None, *, extras, **hparams):
        assert extras == {}
        return super().losses(out, labels, saliency, **hparams)


def test_the_hook_machinery_leaves_the_default_run_bitwise_equal(data_root, tmp_path):
    """The same run through the hooks (doing nothing) and through the published loop: the
    checkpoints' tensors are bitwise equal."""
    with registered(heads=[EpsNoHooks]):
        hooked = train.main(parse(train, train_argv(data_root, tmp_path, "small_epsnohooks", "h", 3)))
    plain = train.main(parse(train, train_argv(data_root, tmp_path, "small_eps", "p", 3)))
    a = torch.load(hooked / train.FINAL_NAME, weights_only=True)
    b = torch.load(plain / train.FINAL_NAME, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hyper_parameters_of_every_type_become_flags():
    class Typed(Head):
        name = "typed"
        hparams = {"warm": HParam(default=False, type=bool, help="a switch"),
                   "mode": HParam(default="a", type=str, choices=("a", "b"), help="a choice"),
                   "k": HParam(default=3, type=int, low=1, help="a count")}

    parser = argparse.ArgumentParser()
    train.add_head_flags(parser, [Typed])
    args = parser.parse_args(["--no-warm", "--mode", "b", "--k", "2"])
    assert (args.warm, args.mode, args.k) == (False, "b", 2)
    assert Typed.resolve_hparams({"warm": True}, "voc12") == {"warm": True, "mode": "a", "k": 3}
    with pytest.raises(ValueError, match="--k must be >= 1"):
        Typed.resolve_hparams({"k": 0}, "voc12")


def test_head_declarations_are_checked_when_the_class_is_made():
    with pytest.raises(TypeError, match="hparams must be a dict"):
        type("Old", (Head,), {"name": "old", "hparams": ("x",)})
    with pytest.raises(TypeError, match="@staticmethod or @classmethod"):
        type("Old", (Head,), {"name": "old", "sample_extras": lambda self, ctx: {}})


def test_parser_is_built_with_the_registered_heads(toys):
    text = train.get_args_parser().format_help()
    assert "--toy-weight" in text and "small_toy" in text and "twoconv_eps" in text
    args = parse(train, ["--data_root", "x", "--network", "small_toy"])
    assert args.toy_weight is None  # not given: the head's default for the dataset, below
    assert train.resolve_args(args, get_dataset("voc12"), 1).toy_weight == 0.5
    bad = parse(train, ["--data_root", "x", "--network", "small_toy", "--toy-weight", "-1"])
    with pytest.raises(train.TrainingError, match="--toy-weight must be >= 0"):
        train.resolve_args(bad, get_dataset("voc12"), 1)  # refused before any compute


# ------------------------------------------------------------------------------------------------
# the second walk-through: a ViT backbone in one file (network/vit.py) + one registry line
# ------------------------------------------------------------------------------------------------
def write_timm_imagenet_weights(path):
    """A stand-in for timm's ImageNet ViT-S/16 weights: the same file layout, random values,
    written by timm itself (nothing is downloaded)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    torch.save(model.state_dict(), path)  # with timm's ImageNet classifier head.*
    return model.state_dict()


@pytest.mark.slow
def test_vit_small_eps_trains_and_infers(data_root, tmp_path):
    pytest.importorskip("timm")
    imagenet = write_timm_imagenet_weights(tmp_path / "vit_small_imagenet.pth")
    # train.py: the EPS head on the ViT trunk, from the (stand-in) ImageNet weights, with the
    # backbone's own optimizer recipe (AdamW, layer-wise lr decay)
    run_dir = train.main(parse(train, [
        "--dataset", "custom", "--data-root", data_root, "--train-list", "train",
        "--network", "vit_small_eps", "--weights", tmp_path / "vit_small_imagenet.pth",
        "--crop-size", 32, "--resize-size", 32, 48, "--batch-size", 4, "--max-iters", 3,
        "--num-workers", 0, "--log-every", 1, "--save-root", tmp_path / "runs",
        "--session", "vit", "--device", "cpu"]))
    recorded = json.loads((run_dir / "args.json").read_text())
    assert (recorded["lr"], recorded["wt_dec"], recorded["freeze_bn"]) == (6e-5, 0.01, False)
    assert "optimizer adamw" in (run_dir / "log.txt").read_text()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in recs)
    trained = torch.load(run_dir / train.FINAL_NAME, weights_only=True)
    assert network_record(trained)["network"] == "vit_small_eps"
    # the trunk started from the file (AdamW moves each weight by about lr per step at most)
    assert (trained["pos_embed"] - imagenet["pos_embed"]).abs().max() < 1e-3
    assert trained["fc8.weight"].shape == (6, 384, 1, 1)  # C + 1 maps on 384 channels

    # infer.py: no --network (the record decides); CAMs at image size from the OS-16 map
    out = tmp_path / "out"
    infer.main(parse(infer, ["--dataset", "custom", "--data-root", data_root, "--weights",
                             run_dir / train.FINAL_NAME, "--png-dir", out / "png",
                             "--cam-dir", out / "cam", "--no-fuse", "--num-workers", 0,
                             "--writer-threads", 1, "--device", "cpu"]))
    info = get_dataset("custom", data_root=data_root)
    for i in info.read_ids("train"):
        keys = np.flatnonzero(info.labels_for(i)).tolist()
        with np.load(out / "cam" / f"{i}.npz") as z:
            assert z["keys"].tolist() == keys and z["cams"].shape == (len(keys), 48, 48)
            assert np.isfinite(z["cams"]).all()
        mask = np.array(Image.open(out / "png" / f"{i}.png"))
        assert set(np.unique(mask)) <= {0} | {k + 1 for k in keys}
    scores = evaluate.main(parse(evaluate, ["--dataset", "custom", "--datalist", "train",
                                            "--data-root", data_root, "--pred-dir", out / "png",
                                            "--num-workers", 0, "--no-progress"]))
    assert 0 <= scores["miou"] <= 1


# ------------------------------------------------------------------------------------------------
# what a new head or backbone gets from the library
# ------------------------------------------------------------------------------------------------
def test_unrecorded_checkpoint_is_identified_by_its_classifier(toys):
    model = build_network("small_toy", 4, width=8)
    sd = model.state_dict()  # no record: released files and other tools' files look like this
    assert network_record(sd) is None
    found = identify_checkpoint(sd, 4)
    assert (found.network, found.num_classes, found.options) == ("small_toy", 4,
                                                                  {"width": 8, "blocks": 1})


def test_imagenet_init_leaves_exactly_the_new_head(toys, tmp_path):
    trunk = build_network("small_cls", 4).state_dict()
    torch.save({k: v for k, v in trunk.items() if not k.startswith("fc8.")}, tmp_path / "in.pth")
    model = build_network("small_toy", 4)
    assert load_pretrained(model, tmp_path / "in.pth")["missing"] == ["classifier.weight"]
    groups = {g["name"]: g["params"] for g in model.get_parameter_groups()}
    assert groups["10x"] == [model.classifier.weight]


@pytest.mark.parametrize("network", ["small_toy", "twoconv_cls", "twoconv_eps", "twoconv_toy"])
def test_the_per_network_tests_pass(toys, network):
    """What the suite checks for every registered network, so a fork that adds its head or
    backbone to the registry's tables inside the package runs it on them as well."""
    import test_network_layout
    import test_network_models

    test_network_layout.test_every_network_has_the_interface(network)
    test_network_models.test_train_step_shapes_and_freezing(network)


class TwoMapsPerClass(Head):
    """2C raw maps, reduced to C by ``cam_probs`` (the max of each pair): no C / C+1 layout."""

    name = "pairs"

    @classmethod
    def out_channels(cls, num_classes: int) -> int:
        return 2 * num_classes

    @staticmethod
    def cam_probs(raw):
        return raw.unflatten(-3, (-1, 2)).amax(dim=-3).relu()


def test_cam_math_takes_any_map_layout_through_cam_probs():
    from network import cam as camlib

    label = torch.tensor([0.0, 1.0, 1.0])
    size = (23, 31)
    g = torch.Generator().manual_seed(0)
    pairs = [torch.randn(2, 6, h, w, generator=g) for h, w in ((4, 5), (7, 9))]
    views = [(p[i], i == 1) for p in pairs for i in (0, 1)]
    s, sb, n = camlib.combine_views_reference(views, size, label, TwoMapsPerClass)
    keys, cams_ref, bg_ref = camlib.finalize(s, sb, n, label)
    fast = [camlib.combine_flip_pair(p, size, keys, label, TwoMapsPerClass) for p in pairs]
    assert all(bg is None for _, bg in fast) and bg_ref is None
    _, cams_fast, _ = camlib.finalize(sum(fg for fg, _ in fast), None, n, label, keys=keys)
    assert keys.tolist() == [1, 2] and cams_ref.shape == (2, *size)
    torch.testing.assert_close(cams_fast, cams_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("network", ["small_toy", "twoconv_cls", "twoconv_toy"])
def test_cpu_inference_graph_matches_the_network(toys, network):
    from network.cpu import fastest_cpu_graph
    from network.cpu.fuse import FusedNetwork

    torch.manual_seed(0)
    model = build_network(network, 3).eval()
    graph = fastest_cpu_graph(model)
    assert isinstance(graph, FusedNetwork) and graph.head is registry.get_head(model)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(graph.forward_cam(x), model.forward_cam(x),
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the registry: registrations come and go
# ------------------------------------------------------------------------------------------------
def test_registered_adds_and_removes():
    before = dict(registry.NETWORKS)

    class Other(ToyHead):
        name = "other"

    with registered(heads=[Other], backbones={"other": TwoConv}):
        assert {"small_other", "other_cls", "other_other"} <= set(registry.NETWORKS)
        alias = registry.NETWORKS["other_other"].__name__
        assert getattr(registry, alias) is registry.NETWORKS["other_other"]  # pickles by name
        with pytest.raises(ValueError, match="taken"):
            register_head(Other)
    assert registry.NETWORKS == before and "other" not in registry.HEADS
    assert "other" not in registry.BACKBONES and not hasattr(registry, alias)
    # A registration that fails inside the block undoes what the block had added.
    with pytest.raises(ValueError, match="starts or ends with '_'"):
        with registered(backbones={"other": TwoConv, "two_conv_": TwoConv}):
            pass
    assert registry.NETWORKS == before


def test_builtins_cannot_be_unregistered():
    for fn, name in ((registry.unregister_head, "eps"), (registry.unregister_backbone, "small"),
                     (registry.unregister_head, "nothing")):
        with pytest.raises(ValueError, match="not a"):
            fn(name)
    register_backbone("other", TwoConv)
    registry.unregister_backbone("other")
    assert not any(n.startswith("other_") for n in registry.NETWORKS)


# ------------------------------------------------------------------------------------------------
# nothing outside network/ decides by a method's name
# ------------------------------------------------------------------------------------------------
def names_a_method(value) -> bool:
    """A string that names a built-in head, backbone or network: "eps", "_cls", "small",
    "resnet38_eps", "network.resnet38_cls" (not "checkpoint_cls.pth")."""
    if not isinstance(value, str):
        return False
    key = value.lower()
    key = key[len("network."):] if key.startswith("network.") else key
    key = key.strip("_")
    heads, backbones = registry.BUILTIN_HEADS, registry.BUILTIN_BACKBONES
    backbone, _, head = key.rpartition("_")  # a head name has no "_"; a backbone's may
    return key in heads | backbones or (bool(backbone) and (backbone in backbones
                                                            or head in heads))


def _constants(node):
    if isinstance(node, ast.Constant):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for e in node.elts for v in _constants(e)]
    return []


def name_comparisons(source: str):
    """(line, strings) of each comparison of a method name: ==, !=, in, startswith/endswith and
    match-case against a string that names a head, backbone or network. Code only: comments
    and docstrings are not compared with anything."""
    found = []
    for node in ast.walk(ast.parse(source)):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            operands = node.args
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        names = [v for o in operands for v in _constants(o) if names_a_method(v)]
        if names:
            found.append((node.lineno, node.col_offset, names))
    return [(line, names) for line, _, names in sorted(found)]


def python_files_outside_network():
    skip = {"network", "tests", "docs"}
    for root, dirs, files in os.walk(REPO):
        top = Path(root) == REPO
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (top and d in skip)]
        yield from (Path(root) / f for f in files if f.endswith(".py"))


def test_name_comparison_finder():
    code = '''
a == "eps"; b != "cls"; "cls" in args.network; n.endswith("_eps"); n.startswith(("small", "x"))
net in ("resnet38_eps", "y"); s == "network.resnet38_cls"
match h:
    case "eps": pass
p.name == "checkpoint_cls.pth"; published["eps"]; amp == "off"; f"{b}_eps"
'''
    assert name_comparisons(code) == [(2, ["eps"]), (2, ["cls"]), (2, ["cls"]), (2, ["_eps"]),
                                      (2, ["small"]), (3, ["resnet38_eps"]),
                                      (3, ["network.resnet38_cls"]), (5, ["eps"])]


def test_nothing_outside_network_compares_method_names():
    files = list(python_files_outside_network())
    assert REPO / "train.py" in files and REPO / "infer.py" in files
    found = [f"{p.relative_to(REPO)}:{line}: {names}" for p in files
             for line, names in name_comparisons(p.read_text(encoding="utf-8"))]
    assert not found, ("decide by the head's attributes (network/heads.py), not by its name:\n"
                       + "\n".join(found))


def test_docs_show_the_code_of_this_file():
    """docs/extending.md is this file (and network/vit.py for the ViT walk-through): every
    function and class it shows is defined there, character for character."""
    import re

    doc = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    # this file, and for the second walk-through the backbone's own file
    here = Path(__file__).read_text(encoding="utf-8")
    vit = (REPO / "network" / "vit.py").read_text(encoding="utf-8")
    shown = []
    for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
        for node in ast.parse(block).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                shown.append(node.name)
                code = ast.get_source_segment(block, node)
                assert code in here or code in vit, node.name
    assert {"ToyHead", "EpsConsistency", "agreement_loss", "TwoConv", "toys", "parse", "ViT",
            "ViTSmall", "test_vit_small_eps_trains_and_infers"} <= set(shown)


def imported_modules(source: str):
    """Every module a file imports, at the top or inside a function: ``import a.b``,
    ``from a.b import c`` (as ``a.b`` and ``a.b.c``) and ``importlib.import_module("a.b")``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found


def test_utils_never_import_network():
    """utils/ is the bottom layer: runtime helpers that know no method. The CAM math lives in
    network/cam.py, the safe torch-file reader in utils/torchfile.py."""
    assert "network.cam" in imported_modules("from network import cam as camlib\n"
                                             "def f():\n    import network.weights")
    files = sorted((REPO / "utils").glob("*.py"))
    assert REPO / "utils" / "cli.py" in files
    found = [f"{p.relative_to(REPO)}: {sorted(m for m in imported_modules(p.read_text()) if m == 'network' or m.startswith('network.'))}"
             for p in files
             if any(m == "network" or m.startswith("network.") for m in imported_modules(p.read_text()))]
    assert not found, "utils/ must not import network/:\n" + "\n".join(found)
