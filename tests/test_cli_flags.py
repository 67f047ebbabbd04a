"""Every command-line flag of every entry point has help text, and every flag that takes a value
has a type (or a fixed set of choices): the project's argparse convention."""
import argparse
import importlib

import pytest

ENTRY_POINTS = ["train", "infer", "evaluate", "train_seg", "infer_seg", "tools.benchmark",
                "tools.check_dataset", "tools.make_cls_labels", "tools.make_coco_masks",
                "tools.convert_cls_labels_npy", "tools.convert_resnet38",
                "tools.make_demo_dataset", "tools.gpu_check", "tools.download",
                "tools.make_saliency", "tools.eval_saliency", "tools.demo_report", "network.vit"]


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


# ------------------------------------------------------------------------------------------------
# One spelling per flag (utils/cli.py): --help and the usage line show each flag once, by its
# hyphenated name; the published spellings are hidden aliases of the same action.
STAGES = ["train", "infer", "evaluate", "train_seg", "infer_seg"]
TOOLS = [m for m in ENTRY_POINTS if m.startswith("tools.")] + ["tools.preflight"]


def _help_and_parser(module):
    from utils.cli import build_parser
    parser = build_parser(importlib.import_module(module).get_args_parser, "doc")
    return parser.format_help(), parser


def _options_part(text):
    """The help without the description and the epilog, which quote published commands."""
    return text.split("\noptions:\n", 1)[1].rsplit("\n\nEach flag is shown", 1)[0]


@pytest.mark.parametrize("module", STAGES + TOOLS)
def test_help_shows_each_flag_once(module):
    import re
    from utils.cli import shown_option_strings
    text, parser = _help_and_parser(module)
    usage, options = text.split("\n\n", 1)[0], _options_part(text)
    # the flag column of the listing (help texts may name a published spelling on purpose)
    invocations = re.findall(r"^  (-[^ ].*?)(?:  |$)", options, flags=re.M)
    tokens_usage = re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", usage)
    tokens_options = re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", " ".join(invocations))
    for action in parser._actions:
        if not action.option_strings:
            continue
        shown = shown_option_strings(action)
        hidden = [s for s in action.option_strings if s not in shown]
        longs = [s for s in shown if s.startswith("--") and not s.startswith("--no-")]
        assert len(longs) <= 1, f"{module}: {action.dest} shows {longs}"
        assert all("_" not in s for s in longs), f"{module}: {longs} is not the hyphenated spelling"
        for s in hidden:  # an alias appears nowhere in the options listing or the usage line
            assert s not in tokens_options and s not in tokens_usage, f"{module}: {s} is shown"
        if action.help != argparse.SUPPRESS:
            assert longs[0] if longs else shown[0] in tokens_options
    # and the listing names each flag once (a second declaration of a flag would repeat it)
    firsts = [inv.split(",")[0].split(" ")[0] for inv in invocations]
    assert len(firsts) == len(set(firsts)), f"{module}: a flag is listed twice"


@pytest.mark.parametrize("module", STAGES)
def test_every_alias_sets_the_same_dest(module):
    """Each spelling of a flag parses into the same dest, and a required flag given by an
    alias counts as given."""
    _, parser = _help_and_parser(module)
    required = [a for a in parser._actions if a.required]
    for action in parser._actions:
        if len(action.option_strings) < 2 or action.nargs == 0 or action.dest == "help":
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            continue
        value = _a_value(action)
        seen = set()
        for spelling in action.option_strings:
            argv = [spelling] + value
            for other in required:  # the other required flags, by their own first spelling
                if other is not action:
                    argv += [other.option_strings[0], "x"]
            args = parser.parse_args(argv)
            seen.add(repr(getattr(args, action.dest)))
        assert len(seen) == 1, f"{module}: {action.option_strings} -> {seen}"
    for action in parser._actions:
        if isinstance(action, argparse.BooleanOptionalAction) and len(action.option_strings) > 2:
            for spelling in action.option_strings:
                base = [x for a in required for x in (a.option_strings[-1], "x")]
                value = getattr(parser.parse_args(base + [spelling]), action.dest)
                assert value is (not spelling.startswith("--no-")), f"{module}: {spelling}"


def _a_value(action):
    if action.choices:
        return [str(sorted(action.choices)[0])]
    n = {None: 1, "?": 1, "*": 1, "+": 1}.get(action.nargs, action.nargs)
    sample = "3" if action.type in (int, float) else "7"
    return [sample] * n


@pytest.mark.parametrize("module", STAGES)
def test_required_flags_given_by_published_alias(module):
    _, parser = _help_and_parser(module)
    argv = []
    for action in parser._actions:
        if action.required:  # the LAST spelling: an alias wherever the flag has one
            argv += [action.option_strings[-1], "x"]
    args = parser.parse_args(argv)
    for action in parser._actions:
        if action.required:
            assert str(getattr(args, action.dest)) == "x"


PUBLISHED = {
    # EPS script/voc12_eps.sh's main.py command (docs/reference.md 1.3), README "The stages one
    # by one" and the published infer.py / evaluate_png.py commands (reference 1.3, 1.10, 1.11)
    "train": ["--dataset", "voc12", "--session", "voc12_eps", "--network", "network.resnet38_eps",
              "--data_root", "VOC/JPEGImages", "--saliency_root", "VOC/SALImages", "--weights",
              "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "--train_list",
              "metadata/voc12/train_aug.txt", "--crop_size", "448", "--resize_size", "256", "512",
              "--batch_size", "8", "--max_iters", "20000", "--lr", "0.01", "--wt_dec", "5e-4",
              "--num_workers", "8", "--tau", "0.4", "--lam", "0.5", "--save_root", "runs"],
    "infer": ["--dataset", "voc12", "--infer_list", "metadata/voc12/train.txt", "--img_root",
              "VOC/JPEGImages", "--network", "network.resnet38_eps", "--weights",
              "checkpoint_cls.pth", "--thr", "0.20", "--n_gpus", "2", "--n_processes_per_gpu",
              "1", "1", "--cam_png", "out/png", "--cam_npy", "out/cam"],
    "evaluate": ["--dataset", "voc12", "--datalist", "metadata/voc12/train.txt", "--gt_dir",
                 "VOC/SegmentationClassAug", "--pred_dir", "out/png", "--save_path", "miou.txt"],
}


@pytest.mark.parametrize("module", sorted(PUBLISHED))
def test_published_commands_parse(module):
    _, parser = _help_and_parser(module)
    args = parser.parse_args(PUBLISHED[module])
    if module == "train":
        assert (str(args.data_root), str(args.saliency_root), args.crop_size, args.resize_size,
                args.batch_size, args.max_iters, args.wt_dec, args.num_workers, args.tau,
                args.lam) == ("VOC/JPEGImages", "VOC/SALImages", 448, [256, 512], 8, 20000,
                              5e-4, 8, 0.4, 0.5)
    elif module == "infer":
        assert (str(args.img_root), str(args.png_dir), str(args.cam_dir), args.n_gpus,
                args.n_processes_per_gpu, args.infer_list) == (
            "VOC/JPEGImages", "out/png", "out/cam", 2, [1, 1], "metadata/voc12/train.txt")
    else:
        assert (str(args.gt_dir), str(args.pred_dir), str(args.save_path)) == (
            "VOC/SegmentationClassAug", "out/png", "miou.txt")


def test_shared_flags_are_declared_once():
    """The flags every stage shares come from utils/flags.py: same spelling, type and help."""
    shared = ("dataset", "metadata_dir", "skip_missing", "check_data", "device")
    seen = {}
    for module in STAGES:
        for action in importlib.import_module(module).get_args_parser()._actions:
            if action.dest in shared:
                seen.setdefault(action.dest, set()).add(
                    (tuple(action.option_strings), action.type, type(action)))
    for dest, variants in seen.items():
        assert len(variants) == 1, f"--{dest} is declared differently: {variants}"
