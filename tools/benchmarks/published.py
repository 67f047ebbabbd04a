"""Benchmark section "published": whole processes against the published programs, the ratio
a user sees (start-up, weight loading, decoding and writing included).

* infer: the published ``infer.py`` command line (EPS script/voc12_eps.sh step 2 on one
  process: ResNet-38 EPS, 4 scales x flip, thr 0.20, pseudo-mask PNGs) on 2 VOC-size images (500x375; ``--quick``: 160x120), run by ``infer.py``
  and by the published process. Target: ``infer.py`` >= 1.5x faster.
* eval: the published ``evaluate_png.py`` command line (step 3) on 400 and 1,449 VOC-size mask pairs
  (``--quick``: 100), run by ``evaluate.py`` (default flags) and by the published process.
  Target: >= 2x.

The published process is ``tools/benchmarks/ref_infer.py`` / ``ref_eval.py``, a step-for-step
re-implementation with the published libraries (this repository carries no EPS code). With
``--eps-repo PATH`` (a checkout of github.com/halbielee/EPS) the real ``infer.py`` and
``evaluate_png.py`` run as well, from a temporary copy with the three changes the published
``infer.py`` needs on a CPU with today's libraries (:data:`INFER_PATCHES`); each of our rows is
then also compared with them.

Timing: the programs run in turn, rep by rep, with the order reversed every other rep (ABBA),
so that the load of other jobs on a shared machine falls on both alike. Each run is one
subprocess; wall seconds, and CPU seconds = user + system time of the process and all its
children (resource.RUSAGE_CHILDREN: the forked inference child, DataLoader and evaluator
workers). Medians over the reps; the speed-ups are ratios of medians, and the target is judged
on both. Wall time is what a user waits for, but on a shared machine it moves with other jobs
(each row gives the 1-minute load average before its runs): trust it only at low load. CPU time
moves much less (other jobs still slow the caches and memory), but it also counts the work of
parallel workers, which the wall time of an idle machine does not see. The weights are random (fixed seed): the timings do not depend on
their values. Generated data (VOC ids with their labels from metadata/voc12, so both programs
take the same command line); every program writes into its own fresh folder.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]
INFER_TARGET = 1.5
EVAL_TARGET = 2.0
# Two VOC train ids (their image labels are in metadata/voc12 and in EPS's cls_labels.npy):
# aeroplane + person, tvmonitor.
INFER_IDS = ("2007_000032", "2007_000039")
EVAL_SIZES = (400, 1449)

# (file, published text, replacement, why): what EPS infer.py needs to run on a CPU with today's
# libraries (the same changes docs/inference.md lists for users of the published code).
INFER_PATCHES = (
    ("infer.py", ".cuda(gpu)", "", "no GPU: the model and images stay on the CPU"),
    ("infer.py", ".cuda(cur_gpu)", "", "no GPU"),
    ("infer.py", "Image.CUBIC", "Image.BICUBIC", "Pillow >= 10 removed the CUBIC alias"),
    ("util/imutils.py", "PIL.Image.CUBIC", "PIL.Image.BICUBIC", "Pillow >= 10"),
    ("infer.py", "cam_np = np.array(cam_list)\n            cam_fg = cam_np[:, 0]",
     "cam_fg = np.array([c[0] for c in cam_list])",
     "numpy >= 1.24 refuses an array of (fg, bg) tuples of two shapes"),
)


class PatchError(UserError):
    """--eps-repo is not an EPS checkout this benchmark can patch; the message says why."""


def patched_eps_copy(eps_repo: Path, dst: Path) -> Path:
    """A copy of the EPS checkout's code and metadata in ``dst`` with :data:`INFER_PATCHES`
    applied; a checkout whose text differs says which change did not apply."""
    eps_repo = Path(eps_repo)
    if not (eps_repo / "infer.py").is_file() or not (eps_repo / "evaluate_png.py").is_file():
        raise PatchError(f"--eps-repo {eps_repo}: no infer.py / evaluate_png.py there (a checkout "
                         f"of github.com/halbielee/EPS is expected)")
    shutil.copytree(eps_repo, dst, ignore=shutil.ignore_patterns(".git", "figure", "log"))
    for rel, old, new, why in INFER_PATCHES:
        path = dst / rel
        text = path.read_text()
        if old not in text:
            raise PatchError(f"--eps-repo {eps_repo}: {rel} has no {old.splitlines()[0]!r} to "
                             f"change ({why}); the checkout differs from the one this benchmark "
                             f"knows (EPS commit 0c2cdd0)")
        path.write_text(text.replace(old, new))
    return dst


# ------------------------------------------------------------------------------------------------
# running and timing
# ------------------------------------------------------------------------------------------------
def timed_run(cmd: Sequence[str], cwd: Path, env: dict) -> Tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one command; a failure is an error
    with the end of its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {' '.join(map(str, cmd))}"
                           f"\n{proc.stdout[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def interleaved(programs: Dict[str, callable], reps: int) -> Dict[str, List[Tuple[float, float]]]:
    """Run each program's ``() -> (wall, cpu)`` ``reps`` times, in turn, the order reversed every
    other rep."""
    names = list(programs)
    out: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            out[name].append(programs[name]())
    return out


def summary_rows(task: str, n: int, runs: Dict[str, List[Tuple[float, float]]], ours: str,
                 references: Sequence[str], target: float, load: float,
                 verdict: bool = True, same: Optional[Dict[str, str]] = None) -> List[dict]:
    """One row per reference program, then one row per (ours vs reference) with the speed-ups
    (ratios of medians) and whether they meet the target, on CPU time and on wall time
    (``verdict=False``: a --quick run, whose small inputs measure mostly start-up, gives none). ``same``: per
    reference, whether ours wrote the same result (a benchmark of two programs that disagree
    would mean nothing)."""
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in runs.items()}

    def row(program, vs=None):
        wall, cpu = med[program]
        r = {"task": task, "program": program, "n": n, "reps": len(runs[program]),
             "wall s": wall, "CPU s": cpu, "vs": vs or "", "speed-up wall": None,
             "speed-up CPU": None, "target": "", "load": round(load, 1)}
        if vs is not None:
            r["speed-up wall"] = med[vs][0] / wall
            r["speed-up CPU"] = med[vs][1] / cpu
            if verdict:
                ok = {k: "met" if r[f"speed-up {k}"] >= target else "NOT met" for k in ("CPU", "wall")}
                r["target"] = f">= {target:g}x: CPU {ok['CPU']}, wall {ok['wall']}"
            else:
                r["target"] = f">= {target:g}x: no verdict (--quick)"
        r["same result"] = (same or {}).get(vs, "") if vs is not None else ""
        return r

    return [row(ref) for ref in references] + [row(ours, ref) for ref in references]


def _env(threads: int) -> dict:
    # the same thread count and OpenMP wait policy for every program (docs: PASSIVE on shared
    # machines); PYTHONPATH unset so that each program imports only its own code
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    return env


# ------------------------------------------------------------------------------------------------
# the two tasks
# ------------------------------------------------------------------------------------------------
def make_infer_data(root: Path, width: int, height: int) -> Tuple[Path, Path, Path]:
    """2 JPEGs named by VOC ids, their list, and random resnet38_eps weights (a plain state dict,
    as the released checkpoints are). Returns (image folder, list, weights)."""
    import torch

    from tools.benchmarks.infer import make_model, synthetic_image

    img_root = root / "JPEGImages"
    img_root.mkdir(parents=True)
    for k, img_id in enumerate(INFER_IDS):
        synthetic_image(width, height, seed=k).save(img_root / f"{img_id}.jpg", quality=90)
    listing = root / "infer_list.txt"
    listing.write_text("\n".join(INFER_IDS) + "\n")
    weights = root / "resnet38_eps.pth"
    torch.save(make_model(torch.device("cpu")).state_dict(), weights)
    return img_root, listing, weights


def _runner(cmd_of, cwd: Path, out: Path, env: dict):
    """() -> (wall, cpu) of one run of ``cmd_of(out)`` in a fresh ``out`` folder."""
    def run():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return timed_run(cmd_of(out), cwd, env)
    return run


def infer_rows(root: Path, args, eps_copy: Optional[Path]) -> List[dict]:
    quick = getattr(args, "quick", False)
    width, height = (160, 120) if quick else (500, 375)
    img_root, listing, weights = make_infer_data(root / "infer_data", width, height)
    env = _env(args.threads)

    def flags(out: Path):  # EPS script/voc12_eps.sh, step 2, on one process
        return ["--dataset", "voc12", "--infer_list", listing, "--img_root", img_root,
                "--network", "network.resnet38_eps", "--weights", weights, "--thr", "0.20",
                "--n_processes_per_gpu", "1", "--cam_png", out / "png"]

    # name -> (output folder, command, working directory)
    progs = {"ref_infer.py": (root / "infer_out/ref", lambda o: [
        sys.executable, REPO / "tools/benchmarks/ref_infer.py", *flags(o)], REPO)}
    if eps_copy is not None:
        progs["EPS infer.py"] = (root / "infer_out/eps",
                                 lambda o: [sys.executable, "infer.py", *flags(o)], eps_copy)
    ours = "infer.py"
    progs[ours] = (root / "infer_out/ours", lambda o: [sys.executable, REPO / "infer.py", *flags(o)],
                   REPO)
    load = os.getloadavg()[0]
    runs = interleaved({k: _runner(cmd, cwd, out, env) for k, (out, cmd, cwd) in progs.items()},
                       reps=1 if quick else 2)
    refs = [p for p in progs if p != ours]
    same = {ref: masks_differ(progs[ours][0] / "png", progs[ref][0] / "png") for ref in refs}
    return summary_rows(f"infer, 2 images {width}x{height}", len(INFER_IDS), runs, ours, refs,
                        INFER_TARGET, load, verdict=not quick, same=same)


def masks_differ(ours: Path, theirs: Path) -> str:
    """"yes" when every pseudo-mask PNG of ours has the same pixels as the reference's, else how
    many pixels differ."""
    import numpy as np
    from PIL import Image

    diff = sum(int((np.asarray(Image.open(ours / f"{i}.png"))
                    != np.asarray(Image.open(theirs / f"{i}.png"))).sum()) for i in INFER_IDS)
    return "yes" if diff == 0 else f"no: {diff} mask pixels differ"


def tables_differ(ours: Path, theirs: Path) -> str:
    """"yes" when the two text tables hold the same mean and per-class lines."""
    return "yes" if ours.read_text().split() == theirs.read_text().split() else "no: tables differ"


def eval_rows(root: Path, args, eps_copy: Optional[Path]) -> List[dict]:
    from tools.benchmarks.eval import make_pairs

    quick = getattr(args, "quick", False)
    sizes = (100,) if quick else EVAL_SIZES
    data = root / "eval_data"
    ids = make_pairs(data, max(sizes))
    env = _env(args.threads)
    rows = []
    for n in sizes:
        listing = data / f"list{n}.txt"
        listing.write_text("\n".join(ids[:n]) + "\n")

        def flags(out: Path, listing=listing):  # EPS script/voc12_eps.sh, step 3
            return ["--dataset", "voc12", "--datalist", listing, "--gt_dir", data / "gt",
                    "--pred_dir", data / "pred", "--save_path", out / "miou.txt"]

        progs = {"ref_eval.py": (root / "eval_out/ref", lambda o: [
            sys.executable, REPO / "tools/benchmarks/ref_eval.py", *flags(o)], REPO)}
        if eps_copy is not None:
            progs["EPS evaluate_png.py"] = (root / "eval_out/eps", lambda o: [
                sys.executable, "evaluate_png.py", *flags(o)], eps_copy)
        ours = "evaluate.py"
        progs[ours] = (root / "eval_out/ours",
                       lambda o: [sys.executable, REPO / "evaluate.py", *flags(o)], REPO)
        load = os.getloadavg()[0]
        runs = interleaved({k: _runner(cmd, cwd, out, env) for k, (out, cmd, cwd) in progs.items()},
                           reps=1 if quick else 3)
        refs = [p for p in progs if p != ours]
        same = {ref: tables_differ(progs[ours][0] / "miou.txt", progs[ref][0] / "miou.txt")
                for ref in refs}
        rows += summary_rows(f"eval, {n} mask pairs 500x375", n, runs, ours, refs, EVAL_TARGET,
                             load, verdict=not quick, same=same)
    return rows


def run(args):
    if getattr(args, "device", "cpu") == "cuda":  # the published programs are timed on the CPU
        return ("Whole process against the published programs",
                [{"task": "skipped: a CPU comparison (--device cpu or all)"}])
    with tempfile.TemporaryDirectory(prefix="eps_bench_published_") as tmp:
        root = Path(tmp)
        eps = getattr(args, "eps_repo", None)
        eps_copy = patched_eps_copy(eps, root / "eps") if eps is not None else None
        rows = eval_rows(root, args, eps_copy) + infer_rows(root, args, eps_copy)
    return ("Whole process against the published programs (speed-up = their median / ours; "
            "wall time is trustworthy only at a low load)", rows)
