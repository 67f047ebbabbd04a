"""Check a whole pipeline before any compute, and print its plan.

The pipeline scripts (script/voc12_eps.sh etc.) build the exact command line of every stage they
are about to run and hand them all to this tool first::

    python tools/preflight.py --nodes 1 --procs 2 --device cuda -- \\
        train train.py --dataset voc12 ... ::: infer infer.py ... ::: eval evaluate.py ...

Every stage's flags are parsed by its own parser and checked by its own functions (the recipe
resolved from data/registry.py, batch divisibility for the number of processes, value ranges),
and every input file or folder is checked unless an earlier stage of the same run produces it.
In a few seconds it either prints the plan (what runs, with which resolved settings, on how many
processes, where outputs land) or lists EVERY problem at once, each with where to get the missing
file (README "Downloads"), and exits with status 2. Nothing is written either way.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.downloads import hint  # noqa: E402
from data.registry import dataset_root_of, get_dataset  # noqa: E402
from utils import provenance  # noqa: E402
from utils.cli import OneSpellingFormatter, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.layout import Layout, LayoutError, plan_layout  # noqa: E402

SEPARATOR = ":::"
SAMPLE = 5  # ids of each list whose files are looked up (the stages check all of them)


class PreflightError(UserError):
    """The pipeline cannot start; the message lists every problem."""


@dataclass
class Stage:
    """One stage of the run: its name, entry point and flags, and what the check found.
    ``procs`` is the processes of the whole stage (all nodes), ``per_node`` those on one node;
    ``fixed`` says whether the count was given (NAME=N) rather than planned."""
    name: str
    script: str
    argv: List[str]
    procs: int = 1
    per_node: int = 1
    nodes: int = 1
    gpus: int = 1                      # GPUs (process slots) per node
    fixed: bool = False
    layout: Optional[Layout] = None    # the training stages' plan (utils/layout.py)
    device: str = "auto"
    made_before: set = field(default_factory=set)   # what earlier stages of the run write

    def made_earlier(self, path) -> bool:
        path = Path(path)
        return any(path == m or m in path.parents for m in self.made_before)

    def usable(self, path) -> bool:
        """An input that exists now and no earlier stage rewrites: its content can be checked."""
        return path is not None and Path(path).is_file() and not self.made_earlier(path)
    plan: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    needs: List[Tuple[Path, str, str]] = field(default_factory=list)  # (path, what, hint)
    makes: List[Path] = field(default_factory=list)

    def need(self, path, what: str, where: str = "") -> None:
        self.needs.append((Path(path), what, where))


def split_stages(tokens: Sequence[str]) -> List[Tuple[str, str, List[str]]]:
    """``NAME SCRIPT ARGS... ::: NAME SCRIPT ARGS...`` -> [(name, script, args), ...]."""
    groups, current = [], []
    for tok in list(tokens) + [SEPARATOR]:
        if tok == SEPARATOR:
            if current:
                if len(current) < 2:
                    raise PreflightError(f"stage {current} needs a name and an entry point")
                groups.append((current[0], current[1], current[2:]))
            current = []
        else:
            current.append(tok)
    return groups


def parse_stage(module, argv: Sequence[str]):
    """Parse with the entry point's own parser; an argparse error becomes a problem string."""
    parser = argparse.ArgumentParser(prog=module.__name__ + ".py", parents=[module.get_args_parser()],
                                     allow_abbrev=False, exit_on_error=False,
                                     formatter_class=OneSpellingFormatter)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(argv)), None
    except (argparse.ArgumentError, SystemExit) as e:
        text = err.getvalue().strip().splitlines()
        return None, (text[-1] if text else str(e))


def _try(stage: Stage, fn: Callable, *a, **k):
    """Run a check; a UserError becomes one of the stage's problems."""
    try:
        return fn(*a, **k)
    except UserError as e:
        stage.problems.append(" ".join(str(e).split()))
        return None


def _download_key(dataset: str, kind: str) -> Optional[str]:
    from data.downloads import DOWNLOADS
    key = f"{dataset}_{kind}"
    return key if key in DOWNLOADS else None


def _where(dataset: str, kind: str, custom: str) -> str:
    key = _download_key(dataset, kind)
    return hint(key) if key else custom


def _dataset(stage: Stage, args, root_attr: str):
    """The dataset registry entry, its id list and image-label table, with the data root's
    first images looked up."""
    root = getattr(args, root_attr)
    meta = getattr(args, "metadata_dir", None)
    info = _try(stage, get_dataset, args.dataset, meta, root)
    if info is None:
        if _download_key(args.dataset, "labels") and stage.problems:
            stage.problems[-1] += f"; {hint(args.dataset + '_labels')}"
        return None
    stage.need(dataset_root_of(root), "dataset root",
               _where(info.name, "images", "the folder that holds JPEGImages/"))
    return info


def _sample_images(stage: Stage, info, root, ids: Sequence[str]) -> None:
    if ids and Path(dataset_root_of(root)).is_dir():
        missing = [str(info.image_path(root, i)) for i in ids[:SAMPLE]
                   if not info.image_path(root, i).is_file()]
        if missing:
            stage.problems.append(f"images of the list not found (first: {missing[0]}): "
                                  f"{_where(info.name, 'images', 'check --data_root')}")


def _ids(stage: Stage, info, name) -> List[str]:
    return _try(stage, info.read_ids, name) or []


def _labels(stage: Stage, info) -> None:
    try:
        info.image_labels
    except UserError as e:
        stage.problems.append(f"{' '.join(str(e).split())}"
                              + (f"; {hint(info.name + '_labels')}" if _download_key(info.name, "labels") else ""))


# ------------------------------------------------------------------------------------------------
# one check per entry point: the entry point's own functions, no compute, nothing written
# ------------------------------------------------------------------------------------------------
def _use_layout(stage: Stage, layout: Layout) -> None:
    stage.layout, stage.per_node, stage.procs = layout, layout.procs_per_node, layout.processes


def _plan(stage: Stage, effective: int, **kw) -> Optional[Layout]:
    """The stage's layout on its nodes' GPUs (a fixed NAME=N count is honoured or refused)."""
    try:
        layout = plan_layout(effective, stage.gpus, stage.nodes,
                             procs_per_node=stage.per_node if stage.fixed else None,
                             override=f"{OVERRIDES.get(stage.name, stage.name)}={stage.per_node}", **kw)
    except LayoutError as e:
        stage.problems.append(str(e))
        return None
    _use_layout(stage, layout)
    return layout


def check_train(stage: Stage, module, args) -> None:
    from network import network_parts
    info = _dataset(stage, args, "data_root")
    if info is None:
        return
    # the recipe first (one process), then the layout that keeps its batch on these GPUs
    resolved = _try(stage, module.resolve_args, argparse.Namespace(**vars(args)), info, 1)
    if resolved is None:
        return
    if _plan(stage, resolved.batch_size, what="classifier", accum=resolved.iter_size) is None:
        return
    args = _try(stage, module.resolve_args, args, info, stage.procs)
    if args is None:
        return
    ids = _ids(stage, info, args.train_list)
    _labels(stage, info)
    _sample_images(stage, info, args.data_root, ids)
    _, head = network_parts(args.network)
    hp = "".join(f", {k} {getattr(args, k)}" for k in head.hparams)
    if head.needs_saliency:
        from data.datasets import default_saliency_root
        sal = args.saliency_root or default_saliency_root(info, args.data_root)
        stage.need(sal, "saliency maps", _where(info.name, "saliency", "one <id>.png per image: "
                                                "tools/make_saliency.py makes them "
                                                "(docs/custom-data.md)"))
    if args.weights != "none":
        stage.need(args.weights, "initial weights (--weights)", hint("imagenet_resnet38"))
        if stage.usable(args.weights):  # read it: headers, keys and shapes, no weight values
            from network.weights import check_initial_weights
            _try(stage, check_initial_weights, args.weights, args.network, info.num_classes)
    _numerics(stage, args.amp)
    run_dir = Path(args.save_root) / args.session
    stage.makes.append(run_dir / module.FINAL_NAME)
    per = args.batch_size // (stage.procs * args.iter_size)
    acc = f" x {args.iter_size} accumulated" if args.iter_size > 1 else ""
    stage.plan.append(
        f"{args.network} on {info.name} {Path(str(args.train_list)).stem} ({len(ids)} ids): "
        f"{args.max_iters} iterations x batch {args.batch_size} ({per} per process on "
        f"{stage.procs}{acc}), crop {args.crop_size}, resize {args.resize_size[0]}-{args.resize_size[1]}, "
        f"lr {args.lr}, weight decay {args.wt_dec}, momentum {args.momentum}{hp}, amp {args.amp} "
        f"-> {run_dir}")


def check_infer(stage: Stage, module, args) -> None:
    _try(stage, module.check_args, args)
    info = _dataset(stage, args, "img_root")
    if info is None:
        return
    name = args.infer_list or info.train_defaults.get("infer_list", "train")
    ids = _ids(stage, info, name)
    if getattr(args, "labels", "gt") == "gt":  # --labels predicted reads no image labels
        _labels(stage, info)
    _sample_images(stage, info, args.img_root, ids)
    stage.need(args.weights, "classifier checkpoint (--weights)", hint("released"))
    if stage.usable(args.weights):
        _try(stage, _check_classifier, args, info)
    problem = module.stale_weights(args, module.output_folders(args),
                                   weights_made_earlier=stage.made_earlier(args.weights))
    if problem:
        stage.problems.append(problem)
    outs = module.given_folders(args)
    stage.makes.extend(outs)
    labels = "image labels"
    if getattr(args, "labels", "gt") == "predicted" and outs:
        home = module.labels_home(args)
        labels = (f"predicted labels (sigmoid >= {args.label_thr}; written to "
                  f"{home / module.PREDICTED_FILE})")
    stage.plan.append(
        f"CAMs -> pseudo-masks of {Path(str(name)).stem} ({len(ids)} ids, split over "
        f"{stage.procs} process(es)), thr {args.thr}, scales {' '.join(map(str, args.scales))} "
        f"+ flips, {labels} -> {', '.join(map(str, outs))}")


def _check_classifier(args, info) -> None:
    """infer.py's identification of --weights (network/weights.py), on its memory-mapped keys
    and shapes."""
    from network.weights import identify_checkpoint, load_state_dict_file
    sd = load_state_dict_file(args.weights, mmap=True)
    identify_checkpoint(sd, info.num_classes, args.network, source=str(args.weights),
                        ambiguous_ok=info.spec.metadata_dir is not None)


def _numerics(stage: Stage, amp) -> None:
    """The requested mixed precision against the device each of the stage's processes gets
    (bf16 on a GPU without native bf16, fp16 on the CPU), in the device's own words."""
    from utils.device import numerics_problems
    amp = {True: "fp16", False: "off"}.get(amp, amp)  # inference: --amp is a switch
    stage.problems.extend(numerics_problems(stage.device, amp, stage.per_node))


def check_evaluate(stage: Stage, module, args) -> None:
    info = _dataset(stage, args, "data_root") if args.data_root is not None else \
        _try(stage, get_dataset, args.dataset, args.metadata_dir, None)
    if info is None:
        return
    ids = _ids(stage, info, args.datalist)
    if args.gt_dir is not None:
        stage.need(args.gt_dir, "ground-truth masks (--gt_dir)",
                   _where(info.name, "masks", "one <id>.png of class indices per image"))
    elif args.data_root is not None and ids and Path(dataset_root_of(args.data_root)).is_dir():
        gt = info.gt_path(dataset_root_of(args.data_root), ids[0])
        if not gt.is_file():
            stage.problems.append(f"ground truth not found ({gt}): "
                                  f"{_where(info.name, 'masks', 'pass --gt_dir')}")
    pred = args.pred_dir if args.pred_dir is not None else args.cam_dir
    stage.need(pred, "predictions to score", "made by the infer stage")
    if not args.overwrite and pred is not None:
        try:
            txt, js = module.output_paths(args.save_path, args.json, pred,
                                          "eval" if args.cam_dir is None else "sweep")
        except UserError as e:
            stage.problems.append(str(e))
        else:
            if txt.exists() or js.exists():
                why = provenance.check(js) or "it is a finished result"
                stage.problems.append(f"{txt if txt.exists() else js} already exists ({why}); "
                                      f"pass --overwrite (EVAL_ARGS) to replace it, or delete it")
    stage.plan.append(f"mIoU of {pred} on {Path(str(args.datalist)).stem} ({len(ids)} ids) -> "
                      f"{args.save_path or 'next to the predictions'}")


def check_train_seg(stage: Stage, module, args) -> None:
    if args.batch_size is None and args.iter_size is None:  # the published 5 x 2, planned
        layout = _plan(stage, module.EFFECTIVE_BATCH, what="DeepLab",
                       max_per_process=module.MAX_PER_PROCESS)
    else:  # set by the user: the passes are theirs, the planner only spreads each pass
        b = module.BATCH_SIZE if args.batch_size is None else args.batch_size
        a = module.ITER_SIZE if args.iter_size is None else args.iter_size
        layout = _plan(stage, b * a, what="DeepLab", accum=a) if b > 0 and a > 0 else None
    if layout is None and not stage.problems:
        stage.problems.append("--batch-size and --iter-size must be >= 1")
    if layout is None:
        return
    _try(stage, module.check_args, args, stage.procs)
    info = _dataset(stage, args, "data_root")
    if info is None:
        return
    ids = _ids(stage, info, args.train_list)
    _sample_images(stage, info, args.data_root, ids)
    if args.mask_dir is not None:
        stage.need(args.mask_dir, "pseudo-masks (--mask-dir)", "made by the infer/pseudo stages")
    if args.init is not None and args.init.lower() != "none":
        stage.need(args.init, "DeepLab initial weights (--init)", hint("deeplab_init"))
        if stage.usable(args.init):  # keys and shapes against the architecture, no values
            from network.deeplab import check_init_file
            _try(stage, check_init_file, args.init, args.arch, info.num_classes + 1,
                 args.init_kind, args.allow_supervised_init)
    _numerics(stage, args.amp)
    run_dir = Path(args.run_dir)
    if (run_dir / module.FINAL_NAME).exists() or (run_dir / module.LAST_NAME).exists():
        stale = provenance.check(run_dir / provenance.RUN_RECORD_NAME)
        if stale:
            stage.problems.append(f"{run_dir} was trained on other inputs: {stale}; move it away "
                                  f"(or delete it) to train DeepLab on the current ones")
    stage.makes.append(Path(args.run_dir) / module.FINAL_NAME)
    if args.batch_size is not None and args.iter_size is not None:
        stage.plan.append(
            f"{args.arch} on the {Path(str(args.train_list)).stem} pseudo-masks ({len(ids)} ids): "
            f"{args.max_iters} iterations x {args.batch_size} x {args.iter_size} accumulated "
            f"(effective {args.batch_size * args.iter_size}; {args.batch_size // stage.procs} per "
            f"process and pass on {stage.procs}), crop {args.crop_size}, lr {args.lr} "
            f"-> {args.run_dir}")


def check_infer_seg(stage: Stage, module, args) -> None:
    info = _dataset(stage, args, "data_root")
    if info is None:
        return
    ids = _ids(stage, info, args.list)
    _sample_images(stage, info, args.data_root, ids)
    weights = Path(args.weights)
    weights = weights / "checkpoint_final.pth" if weights.suffix != ".pth" else weights
    stage.need(weights, "DeepLab checkpoint (--weights)", "made by the seg stage")
    if stage.usable(weights):
        _try(stage, _check_deeplab, weights, info)
    args.weights = weights
    out = Path(args.out_dir)
    folders = [out, (args.crf_dir or out.with_name(out.name + "_crf"))] if args.crf else [out]
    problem = module.stale_predictions(args, folders, stage.made_earlier(weights))
    if problem:
        stage.problems.append(problem)
    if args.evaluate and args.gt_dir is not None:
        stage.need(args.gt_dir, "val ground truth (--gt_dir)",
                   _where(info.name, "masks", "one <id>.png of class indices per image"))
    elif args.evaluate and ids and Path(dataset_root_of(args.data_root)).is_dir():
        # found only after hours of training and inference otherwise
        gt = [info.gt_path(dataset_root_of(args.data_root), i) for i in ids[:SAMPLE]]
        missing = [g for g in gt if not g.is_file()]
        if missing:
            stage.problems.append(
                f"ground truth of {Path(str(args.list)).stem} not found (e.g. {missing[0]}), so "
                f"no score could be computed: "
                f"{_where(info.name, 'masks', 'one <id>.png of class indices per image')}; or "
                f"pass --gt_dir (SEG_GT_DIR), or --no-evaluate (SEGINFER_ARGS) to predict "
                f"without a score")
    if args.crf:
        try:
            from utils.crf import _densecrf
            _densecrf()
        except ImportError as e:
            stage.problems.append(f"{e}; or SEG_CRF=0")
    stage.makes.append(Path(args.out_dir))
    stage.plan.append(f"DeepLab on {Path(str(args.list)).stem} ({len(ids)} ids)"
                      f"{' + dense CRF' if args.crf else ''} -> {args.out_dir}")


def _check_deeplab(weights: Path, info) -> None:
    """infer_seg.py's reading of its checkpoint: a DeepLab-v2 of a known architecture with the
    dataset's class count (memory-mapped keys and shapes)."""
    from network.deeplab import SegWeightsError, infer_arch, read_state_dict
    try:
        _, n = infer_arch(read_state_dict(weights, mmap=True))
    except SegWeightsError as e:
        raise SegWeightsError(f"{weights}: {e}") from None
    if n != info.num_classes + 1:
        raise SegWeightsError(f"{weights} predicts {n} classes but {info.name} has "
                              f"{info.num_classes + 1} (background included): wrong --dataset?")


def check_make_saliency(stage: Stage, module, args) -> None:
    from data.registry import get_dataset_files
    _try(stage, module.check_args, args)
    files = _try(stage, get_dataset_files, args.dataset, args.metadata_dir, args.data_root)
    if files is None:
        return
    stage.need(dataset_root_of(args.data_root), "dataset root", "the folder that holds JPEGImages/")
    ids = _ids(stage, files, args.list)
    _sample_images(stage, files, args.data_root, ids)
    out = args.out if args.out is not None else \
        dataset_root_of(args.data_root) / files.spec.saliency_dir
    done = set(module.existing_maps(out))
    todo = ids if args.overwrite else [i for i in ids if i not in done]
    _try(stage, module.check_folder, out, args, done)
    if todo and not args.dry_run and _try(stage, module.import_rembg) is not None:
        _try(stage, module.providers_for, args.device)
    stage.makes.append(out)
    model = (f"--model-path {args.model_path} (fed as {args.model})" if args.model_path
             else f"{args.model} through rembg (weights fetched on first use)")
    stage.plan.append(f"saliency maps of {Path(str(args.list)).stem} ({len(ids)} ids, "
                      f"{len(todo)} to make) with {model}, {args.postprocess} -> {out}")


CHECKS: Dict[str, Callable] = {"train": check_train, "infer": check_infer,
                               "evaluate": check_evaluate, "train_seg": check_train_seg,
                               "infer_seg": check_infer_seg, "make_saliency": check_make_saliency}
# Entry points that live in tools/ rather than at the top of the repository.
MODULES = {"make_saliency": "tools.make_saliency"}


def check_device(device: str, procs_per_node: int) -> List[str]:
    """--device cuda: a usable CUDA with at least the GPUs one node asks for (utils/device.py)."""
    if device != "cuda":
        return []
    from utils.device import cuda_problem
    problem = cuda_problem()
    if problem is not None:
        return [f"DEVICE=cuda: {problem}; or DEVICE=cpu to run on the CPU"]
    import torch
    if torch.cuda.device_count() < procs_per_node:
        return [f"NGPUS={procs_per_node} but this node sees {torch.cuda.device_count()} GPU(s); "
                f"lower NGPUS or check CUDA_VISIBLE_DEVICES"]
    return []


# The scripts' variables that fix a stage's processes per node (docs/pipelines.md).
OVERRIDES = {"train": "CLS_NGPUS", "seg": "SEG_NGPUS"}
# Entry points that run as one process on node 0 whatever the hardware (the scripts' `eval`).
SINGLE = ("evaluate", "make_saliency")


def preflight(groups, nodes: int, procs: Dict[str, int], device: str) -> List[Stage]:
    """Check every stage; returns them with their plans, layouts and problems. ``procs``:
    {"*": GPUs (process slots) per node, NAME: a fixed count per node for stage NAME}; the
    training stages without a fixed count get the layout planner's (utils/layout.py), the
    inference stages use every GPU, evaluation runs as one process on node 0."""
    stages, made = [], set()
    gpus = procs.get("*", 1)
    for name, script, argv in groups:
        module_name = Path(script).stem
        if module_name not in CHECKS:
            raise PreflightError(f"stage {name}: no check for entry point {script}")
        module = importlib.import_module(MODULES.get(module_name, module_name))
        single = module_name in SINGLE
        per_node = 1 if single else procs.get(name, gpus)
        stage = Stage(name, script, argv, procs=(1 if single else nodes) * per_node,
                      per_node=per_node, nodes=1 if single else nodes,
                      gpus=max(gpus, per_node), fixed=name in procs, device=device,
                      made_before=set(made))
        args, err = parse_stage(module, argv)
        if err is not None:
            stage.problems.append(f"flags: {err}")
        else:
            CHECKS[module_name](stage, module, args)
        for path, what, where in stage.needs:
            produced = any(path == m or m in path.parents for m in made)
            if not produced and not path.exists():
                stage.problems.append(f"{what} not found: {path}" + (f"; {where}" if where else ""))
        made.update(Path(m) for m in stage.makes)
        stages.append(stage)
    return stages


def where_it_runs(s: Stage) -> str:
    """What will run, e.g. '[1 process, node 0]', '[4 processes]', '[2 per node x 2 nodes]'."""
    if s.nodes > 1:
        return f"[{s.per_node} process(es) per node x {s.nodes} nodes = {s.procs}]"
    if Path(s.script).stem in SINGLE:
        return "[1 process, node 0]"
    return f"[{s.procs} processes]" if s.procs > 1 else "[1 process]"


def format_plan(stages: Sequence[Stage], title: str, unit: str = "GPUs") -> str:
    lines = [title]
    for s in stages:
        for text in s.plan or ["(not planned: see the problems below)"]:
            lines.append(f"  {s.name:<8} {text} {where_it_runs(s)}")
        if s.layout is not None:
            lines.append(f"  {'':<8} layout: {s.layout.describe(unit)}")
    return "\n".join(lines)


def write_layouts(stages: Sequence[Stage], path) -> None:
    """'NAME PROCESSES_PER_NODE' per stage, for the scripts' launcher (script/_stages.sh)."""
    from utils.io import atomic_write_text
    atomic_write_text(path, "".join(f"{s.name} {s.per_node}\n" for s in stages))


def get_args_parser():
    p = argparse.ArgumentParser("Check a pipeline before running it", add_help=False)
    p.add_argument("--title", type=str, default="plan",
                   help="first line of the printed plan (e.g. the script name and hardware)")
    p.add_argument("--nodes", type=int, default=1, help="machines (NNODES of the scripts)")
    p.add_argument("--procs", type=str, nargs="*", default=["*=1"],
                   help="'*=G': GPUs (process slots) per node; NAME=N fixes stage NAME's "
                        "processes per node (e.g. '*=4 seg=2'); training stages without one get "
                        "the layout planner's count (utils/layout.py), evaluation runs as 1")
    p.add_argument("--layout-out", type=Path, default=None,
                   help="write each stage's processes per node here ('NAME N' lines), for the "
                        "pipeline scripts' launcher")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="the stages' --device: cuda is checked here (driver, GPUs per node)")
    p.add_argument("stages", nargs=argparse.REMAINDER,
                   help="NAME SCRIPT ARGS... groups separated by ':::' (after '--')")
    return p


def main(args) -> List[str]:
    """Print the plan; returns the problems (printed to stderr, one per line)."""
    tokens = args.stages[1:] if args.stages[:1] == ["--"] else args.stages
    procs = {}
    for item in args.procs:
        key, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise PreflightError(f"--procs {item}: expected NAME=N with N >= 1")
        procs[key] = int(value)
    stages = preflight(split_stages(tokens), args.nodes, procs, args.device)
    problems = check_device(args.device, max([s.per_node for s in stages] + [1]))
    problems += [f"{s.name}: {p}" for s in stages for p in s.problems]
    print(format_plan(stages, args.title, "processes" if args.device == "cpu" else "GPUs"),
          flush=True)
    if args.layout_out is not None and not problems:
        write_layouts(stages, args.layout_out)
    if problems:
        # Every problem at once, one per line (a user fixes them all before the next try).
        print(f"preflight: error: {len(problems)} problem(s), nothing was run:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        sys.stderr.flush()
    return problems


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__, exit_code=lambda problems: 2 if problems else 0))
