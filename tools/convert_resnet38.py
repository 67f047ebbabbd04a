"""Convert the ImageNet ResNet-38 MXNet weights to a PyTorch state_dict, without MXNet.

    python tools/convert_resnet38.py ilsvrc-cls_rna-a1_cls1000_ep-0001.params resnet38d_imagenet.pth

Reads any of the legacy / V1 / V2 / V3 record formats (network/mxnet_params.py), renames the
ademxapp names to the psa ResNet38d trunk (psa convert_mxnet_to_torch), drops the ImageNet classifier
(linear1000), checks that exactly the 191 trunk tensors are present with the trunk's shapes,
loads them strictly into a ResNet38d trunk, saves its state_dict atomically, and prints the
sha256 of the output. Training also accepts the .params file directly; the .pth loads faster.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from network import mxnet_params  # noqa: E402
from network.resnet38d import ResNet38d, convert_mxnet_to_torch  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.io import torch_save  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fetch import sha256_of  # noqa: E402
from utils.run import check_writable  # noqa: E402

logger = logging.getLogger(__name__)

NUM_TRUNK_TENSORS = 191  # 44 conv weights + 37 BN x 4 (docs/networks.md: without fc8 and counters)


class ConversionError(UserError):
    pass


def convert(params_path: Path) -> dict:
    """Return the trunk state_dict (with BN num_batches_tracked) converted from ``params_path``,
    after checking the key count, every shape, and a strict load."""
    arrays = mxnet_params.load_params(params_path)
    logger.info("%s: %d arrays", params_path, len(arrays))
    try:
        sd = convert_mxnet_to_torch(arrays)
        del arrays  # the tensors share or copy this memory; drop the rest (e.g. linear1000)
    except KeyError as e:
        raise ConversionError(f"{params_path}: {e.args[0]}; is this the ResNet-38 (A1) ImageNet file "
                              "ilsvrc-cls_rna-a1_cls1000_ep-0001.params?") from None
    trunk = ResNet38d()
    expected = {k: v.shape for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(expected) == NUM_TRUNK_TENSORS, len(expected)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if len(sd) != NUM_TRUNK_TENSORS or missing or extra:
        raise ConversionError(f"{params_path}: {len(sd)} trunk tensors after renaming, expected "
                              f"{NUM_TRUNK_TENSORS}; missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [(k, tuple(v.shape), tuple(expected[k])) for k, v in sd.items() if v.shape != expected[k]]
    if bad:
        raise ConversionError(f"{params_path}: shape mismatches (key, file, trunk): {bad[:5]}")
    # Strict: the converted dict plus BN's counters must be exactly the trunk's state_dict.
    counters = {k: v for k, v in trunk.state_dict().items() if k.endswith("num_batches_tracked")}
    trunk.load_state_dict({**sd, **counters}, strict=True)
    return trunk.state_dict()


def get_args_parser():
    p = argparse.ArgumentParser("Convert ResNet-38 MXNet .params to .pth", add_help=False)
    p.add_argument("params", type=Path,
                   help="ImageNet MXNet weights, e.g. ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    p.add_argument("output", type=Path, help="output .pth (a plain trunk state_dict, 228 entries)")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                   help="overwrite an existing output file")
    return p


def main(args) -> str:
    # Every input problem is one line before the 420 MB read (an unreadable, truncated or corrupt
    # .params file is a WeightsError from the reader; a wrong file a ConversionError).
    if not args.params.is_file():
        raise ConversionError(f"{args.params}: file not found; download the ImageNet ResNet-38 "
                              f"weights (README 'Downloads')")
    if args.output.exists() and not args.force:
        raise ConversionError(f"{args.output} exists; pass --force to overwrite it")
    check_writable(args.output.parent, "output")
    sd = convert(args.params)
    torch_save(sd, args.output)
    digest = sha256_of(args.output)
    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    logger.info("wrote %s: %d entries, %d values", args.output, len(sd), n_params)
    print(f"sha256 {digest}  {args.output}")
    return digest


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
