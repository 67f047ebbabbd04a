"""The ViT backbones (network/vit.py): the feature map the heads get, the optimizer recipe it
declares, ImageNet weights in timm's layout, and timm as an optional dependency. The end-to-end
walk-through (train + infer vit_small_eps) is in tests/test_extending.py."""
import ast
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import train  # noqa: E402
from data.registry import get_dataset  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from network import build_network  # noqa: E402
from network import vit  # noqa: E402
from network.weights import identify_checkpoint, load_pretrained, read_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_patch_tokens_as_a_map_at_output_stride_16():
    """The map is timm's own forward (padded to a multiple of 16, position embedding resampled
    to the grid, final norm) without the class token, on the re-normalised input."""
    torch.manual_seed(0)
    model = build_network("vit_small_eps", 3).eval()
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                            dynamic_img_size=True, dynamic_img_pad=True).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc8.")})
    x = torch.randn(2, 3, 40, 56)  # neither side a multiple of 16
    with torch.no_grad():
        feats = model.forward_features(x)
        mean = torch.tensor(vit.VIT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(vit.VIT_STD).view(1, 3, 1, 1)
        pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        tokens = ref.forward_features((pixels - mean) / std)
    assert model.output_stride == 16 and feats.shape == (2, 384, 3, 4)  # ceil(40/16), ceil(56/16)
    torch.testing.assert_close(feats, tokens[:, 1:].transpose(1, 2).reshape(2, 384, 3, 4),
                               rtol=1e-4, atol=1e-5)
    assert model.forward_cam(x).shape == (2, 4, 3, 4)  # EPS: C + 1 maps on the same grid
    # the pipeline's normalisation constants are data/transforms.py's
    assert (vit.PIPELINE_MEAN, vit.PIPELINE_STD) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))


def test_parameter_groups_layer_wise_decay():
    model = build_network("vit_small_cls", 3)
    groups = {g["name"]: g for g in model.get_parameter_groups()}
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in groups.values() for p in g["params"]}
    assert sorted(where) == sorted(names.values())  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups.values()) == len(names)
    decay = vit.ViT.layer_decay
    assert where["blocks.11.attn.qkv.weight"]["lr_mult"] == pytest.approx(decay)
    assert where["blocks.0.mlp.fc1.weight"]["lr_mult"] == pytest.approx(decay ** 12)
    assert where["pos_embed"]["lr_mult"] == where["patch_embed.proj.weight"]["lr_mult"] \
        == pytest.approx(decay ** 13)
    assert where["norm.weight"]["lr_mult"] == 1 and where["fc8.weight"]["lr_mult"] == 10
    for name in ("pos_embed", "cls_token", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias",
                 "norm.bias"):
        assert where[name]["weight_decay_mult"] == 0, name
    for name in ("blocks.3.attn.qkv.weight", "patch_embed.proj.weight", "fc8.weight"):
        assert where[name]["weight_decay_mult"] == 1, name


def test_the_backbone_declares_its_optimizer_recipe():
    """--lr / --wt-dec / --warmup-iters default to the ViT's recipe (AdamW, ToCo's values), the
    ResNets keep the published SGD and the dataset's values; flags override both."""
    def resolve(*argv):
        args = train.get_args_parser().parse_args(["--data-root", "x", "--weights", "w.pth", *argv])
        return train.resolve_args(args, get_dataset("voc12"), 1)

    a = resolve("--network", "vit_small_eps")
    assert (a.lr, a.wt_dec, a.warmup_iters, a.max_iters) == (6e-5, 0.01, 1500, 20000)
    assert a.freeze_bn is False and a.tau == 0.4 and a.lam == 0.5
    b = resolve("--network", "resnet38_eps")
    assert (b.lr, b.wt_dec, b.warmup_iters, b.freeze_bn) == (0.01, 5e-4, 0, True)
    c = resolve("--network", "vit_base_cls", "--lr", "1e-4", "--warmup-iters", "0")
    assert (c.lr, c.wt_dec, c.warmup_iters) == (1e-4, 0.01, 0)
    recipe = vit.ViTSmall.optimizer_recipe
    assert (recipe.name, recipe.betas, recipe.eps, recipe.warmup_ratio) == ("adamw", (0.9, 0.999),
                                                                            1e-8, 1e-6)


def test_imagenet_weights_in_timms_layout(tmp_path):
    """A timm state dict (its head.* classifier included) is the ImageNet initialisation: the
    classifier is dropped and exactly the EPS head's fc8 stays new."""
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "in1k.pth")
    assert "head.weight" not in read_pretrained(tmp_path / "in1k.pth")
    model = build_network("vit_small_eps", 20)
    assert load_pretrained(model, tmp_path / "in1k.pth")["missing"] == ["fc8.weight"]
    assert torch.equal(model.state_dict()["blocks.5.mlp.fc2.weight"],
                       ref.state_dict()["blocks.5.mlp.fc2.weight"])
    # an unrecorded trained file is identified by its shapes, as vit_small (not vit_base)
    found = identify_checkpoint(model.state_dict(), 20)
    assert (found.network, found.num_classes) == ("vit_small_eps", 20)


def test_timm_is_optional(monkeypatch, tmp_path):
    """Without timm: a ViT network is a one-line error naming the requirement file, and every
    other network (and identifying its checkpoints) works without importing it."""
    monkeypatch.setitem(sys.modules, "timm", None)  # "import timm" raises ImportError
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    with pytest.raises(vit.TimmMissing, match=r"pip install -r requirements-timm\.txt"):
        build_network("vit_small_eps", 20)
    sd = build_network("small_eps", 20).state_dict()
    assert identify_checkpoint(sd, 20).network == "small_eps"  # no ViT built to compare


def test_only_network_vit_imports_timm():
    found = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "timm" or n.startswith("timm.") for n in names):
                found.append(str(rel))
    assert set(found) == {"network/vit.py"}


def test_weights_from_timms_own_loader(monkeypatch, tmp_path):
    """python -m network.vit: the file timm's loader gives, in timm's key names (the download is
    timm's; here a model with random weights stands in for it)."""
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return timm.models.create_model(name.split(".")[0], pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    args = vit.get_args_parser().parse_args(["vit_small", str(tmp_path / "w.pth")])
    vit.main(args)
    assert calls == [("vit_small_patch16_224.augreg_in21k_ft_in1k", True)]
    model = build_network("vit_small_cls", 20)
    assert load_pretrained(model, tmp_path / "w.pth")["missing"] == ["fc8.weight"]
    with pytest.raises(vit.UserError, match="exists"):
        vit.main(args)
