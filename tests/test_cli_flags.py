"""Every command-line flag of every entry point has help text, and every flag that takes a value
has a type (or a fixed set of choices): the project's argparse convention."""
import argparse
import importlib

import pytest

ENTRY_POINTS = ["train", "infer", "evaluate", "train_seg", "infer_seg", "tools.benchmark",
                "tools.check_dataset", "tools.make_cls_labels", "tools.make_coco_masks",
                "tools.convert_cls_labels_npy", "tools.convert_resnet38",
                "tools.make_demo_dataset", "tools.gpu_check", "tools.make_saliency",
                "tools.eval_saliency"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_flag_has_help_and_type(module):
    parser = importlib.import_module(module).get_args_parser()
    assert parser.add_help is False, "get_args_parser() must use add_help=False (reusable parent)"
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module}: {name} has no help text"
        takes_value = action.nargs != 0 and not isinstance(
            action, (argparse._StoreConstAction, argparse._CountAction,
                     argparse.BooleanOptionalAction))
        if takes_value:
            assert action.type is not None or action.choices is not None, \
                f"{module}: {name} takes a value but has no type= (or choices=)"
