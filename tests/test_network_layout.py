"""The ResNet-38 networks have exactly the published state_dict layout (EPS resnet38_eps.py), so
the authors' released checkpoints load key for key. The expected list below is written out from
the published modules, not generated from our model. Models are built on the meta device (shapes
only, no memory), so these tests are fast."""
import pytest
import torch

from network import NETWORKS, build_network
from network.weights import head_keys

# One line per module, in published order. "BN <name> <C>" expands to the five BN entries
# (weight, bias, running_mean, running_var: [C]; num_batches_tracked: []).
PUBLISHED_TRUNK = """
conv1a.weight 64,3,3,3
BN b2.bn_branch2a 64
b2.conv_branch2a.weight 128,64,3,3
BN b2.bn_branch2b1 128
b2.conv_branch2b1.weight 128,128,3,3
b2.conv_branch1.weight 128,64,1,1
BN b2_1.bn_branch2a 128
b2_1.conv_branch2a.weight 128,128,3,3
BN b2_1.bn_branch2b1 128
b2_1.conv_branch2b1.weight 128,128,3,3
BN b2_2.bn_branch2a 128
b2_2.conv_branch2a.weight 128,128,3,3
BN b2_2.bn_branch2b1 128
b2_2.conv_branch2b1.weight 128,128,3,3
BN b3.bn_branch2a 128
b3.conv_branch2a.weight 256,128,3,3
BN b3.bn_branch2b1 256
b3.conv_branch2b1.weight 256,256,3,3
b3.conv_branch1.weight 256,128,1,1
BN b3_1.bn_branch2a 256
b3_1.conv_branch2a.weight 256,256,3,3
BN b3_1.bn_branch2b1 256
b3_1.conv_branch2b1.weight 256,256,3,3
BN b3_2.bn_branch2a 256
b3_2.conv_branch2a.weight 256,256,3,3
BN b3_2.bn_branch2b1 256
b3_2.conv_branch2b1.weight 256,256,3,3
BN b4.bn_branch2a 256
b4.conv_branch2a.weight 512,256,3,3
BN b4.bn_branch2b1 512
b4.conv_branch2b1.weight 512,512,3,3
b4.conv_branch1.weight 512,256,1,1
BN b4_1.bn_branch2a 512
b4_1.conv_branch2a.weight 512,512,3,3
BN b4_1.bn_branch2b1 512
b4_1.conv_branch2b1.weight 512,512,3,3
BN b4_2.bn_branch2a 512
b4_2.conv_branch2a.weight 512,512,3,3
BN b4_2.bn_branch2b1 512
b4_2.conv_branch2b1.weight 512,512,3,3
BN b4_3.bn_branch2a 512
b4_3.conv_branch2a.weight 512,512,3,3
BN b4_3.bn_branch2b1 512
b4_3.conv_branch2b1.weight 512,512,3,3
BN b4_4.bn_branch2a 512
b4_4.conv_branch2a.weight 512,512,3,3
BN b4_4.bn_branch2b1 512
b4_4.conv_branch2b1.weight 512,512,3,3
BN b4_5.bn_branch2a 512
b4_5.conv_branch2a.weight 512,512,3,3
BN b4_5.bn_branch2b1 512
b4_5.conv_branch2b1.weight 512,512,3,3
BN b5.bn_branch2a 512
b5.conv_branch2a.weight 512,512,3,3
BN b5.bn_branch2b1 512
b5.conv_branch2b1.weight 1024,512,3,3
b5.conv_branch1.weight 1024,512,1,1
BN b5_1.bn_branch2a 1024
b5_1.conv_branch2a.weight 512,1024,3,3
BN b5_1.bn_branch2b1 512
b5_1.conv_branch2b1.weight 1024,512,3,3
BN b5_2.bn_branch2a 1024
b5_2.conv_branch2a.weight 512,1024,3,3
BN b5_2.bn_branch2b1 512
b5_2.conv_branch2b1.weight 1024,512,3,3
BN b6.bn_branch2a 1024
b6.conv_branch2a.weight 512,1024,1,1
BN b6.bn_branch2b1 512
b6.conv_branch2b1.weight 1024,512,3,3
BN b6.bn_branch2b2 1024
b6.conv_branch2b2.weight 2048,1024,1,1
b6.conv_branch1.weight 2048,1024,1,1
BN b7.bn_branch2a 2048
b7.conv_branch2a.weight 1024,2048,1,1
BN b7.bn_branch2b1 1024
b7.conv_branch2b1.weight 2048,1024,3,3
BN b7.bn_branch2b2 2048
b7.conv_branch2b2.weight 4096,2048,1,1
b7.conv_branch1.weight 4096,2048,1,1
BN bn7 4096
"""


def published_layout(fc8_rows):
    """[(key, shape)] of the published state_dict with an fc8 of ``fc8_rows`` outputs."""
    out = []
    for line in PUBLISHED_TRUNK.strip().splitlines():
        parts = line.split()
        if parts[0] == "BN":
            name, c = parts[1], int(parts[2])
            out += [(f"{name}.{s}", (c,)) for s in ("weight", "bias", "running_mean", "running_var")]
            out.append((f"{name}.num_batches_tracked", ()))
        else:
            out.append((parts[0], tuple(int(d) for d in parts[1].split(","))))
    out.append(("fc8.weight", (fc8_rows, 4096, 1, 1)))
    return out


def meta_model(name, num_classes, **kw):
    with torch.device("meta"):
        return build_network(name, num_classes, **kw)


def test_reference_list_counts():
    layout = published_layout(21)
    assert len(layout) == 229
    assert len([k for k, _ in layout if not k.endswith("num_batches_tracked")]) == 192
    # "44 conv weights" of the published layout counts fc8 (a 1x1 conv): 43 in the trunk + fc8.
    assert sum(1 for _, shape in layout if len(shape) == 4) == 44
    assert sum(1 for k, _ in layout if k.endswith("num_batches_tracked")) == 37


@pytest.mark.parametrize("name,num_classes,fc8_rows", [
    ("resnet38_eps", 20, 21),  # VOC EPS
    ("resnet38_cls", 20, 20),  # VOC baseline
    ("resnet38_eps", 80, 81),  # COCO EPS
    ("resnet38_cls", 80, 80),  # COCO baseline
])
def test_state_dict_matches_published_layout(name, num_classes, fc8_rows):
    sd = meta_model(name, num_classes).state_dict()
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert got == published_layout(fc8_rows)  # key for key, in order, with shapes
    assert sd["b2.bn_branch2a.num_batches_tracked"].dtype == torch.int64


def test_parameter_count_matches_reference():
    model = meta_model("resnet38_eps", 20)
    assert sum(p.numel() for p in model.parameters()) == 105_156_928
    assert model.fc8.weight.numel() == 86_016


def test_trunk_geometry_on_meta():
    """Output stride 8 (448 → 56, 321 → 41) and the tap channels, shape-only."""
    model = meta_model("resnet38_eps", 20).eval()
    for size, out in ((448, 56), (321, 41)):
        feats = model.forward_as_dict(torch.empty(1, 3, size, size, device="meta"))
        assert feats["conv4"].shape == (1, 512, out, out)
        assert feats["conv5"].shape == (1, 1024, out, out)
        assert feats["conv6"].shape == (1, 4096, out, out)


def test_dilations_and_dropout_as_published():
    m = meta_model("resnet38_cls", 20)
    assert m.b5.conv_branch2a.dilation == (1, 1) and m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b5_1.conv_branch2a.dilation == (2, 2)
    assert m.b6.conv_branch2b1.dilation == (4, 4) and m.b7.conv_branch2b1.dilation == (4, 4)
    assert [m.b2.conv_branch2a.stride, m.b3.conv_branch2a.stride, m.b4.conv_branch2a.stride] == [(2, 2)] * 3
    assert m.b6.dropout_2b1.p == 0.3 and m.b6.dropout_2b2.p == 0.3
    assert m.b7.dropout_2b1.p == 0.5 and m.b7.dropout_2b2.p == 0.5
    assert m.dropout7.p == 0.5 and not hasattr(meta_model("resnet38_eps", 20), "dropout7")
    assert all(bn.eps == 1e-5 and bn.momentum == 0.1 for bn in m.modules()
               if isinstance(bn, torch.nn.BatchNorm2d))
    assert m.fc8.bias is None


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_has_the_interface(name):
    # Any registered network, a fork's too (tests/test_extending.py runs it on toy networks).
    m = meta_model(name, 20)
    assert m.head_type == name.rsplit("_", 1)[1]
    assert m.num_classes == 20 and m.arch == name.rsplit("_", 1)[0]
    sd = m.state_dict()
    assert sd[m.classifier_key].shape[0] == m.out_channels(20)
    head = head_keys(m)
    assert m.classifier_key in head and list(sd)[-len(head):] == head  # head after the trunk
