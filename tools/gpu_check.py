"""The Python half of ``script/gpu_check.sh`` (docs/gpu.md): the environment check before the
steps, and the report after them.

    python tools/gpu_check.py env --out gpu_check_out --device cuda
    python tools/gpu_check.py report --out gpu_check_out --device cuda

``env`` records the machine (GPUs, driver, torch / CUDA / cuDNN / NCCL and library versions,
whether pydensecrf is installed) in ``<out>/env.json`` and imports every module of the project,
so that an API this torch lacks shows up as one failed step instead of a crash deep inside a
later one. It fails (exit 2, one line) when ``--device cuda`` has no usable GPU or a module does
not import.

``report`` reads what the steps left under ``--out`` (steps.tsv written by the script, the
JUnit XML of the CUDA tests, the runs' metrics and logs, benchmark.json) and writes
``<out>/gpu_check.md``: each step's status and time, throughput and peak memory, the benchmark
tables, and the projected wall time of the full VOC and COCO recipes on this GPU, computed from
the measured per-iteration and per-image times (the formulas are printed with the numbers). It
prints the report and exits with 1 when a step failed or did not run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.cli import run_cli  # noqa: E402
from utils.device import SHM_PER_WORKER_MB  # noqa: E402
from utils.errors import UserError  # noqa: E402

# Full recipes (docs/training.md, docs/segmentation.md, docs/pipelines.md; list sizes from
# metadata/): what the projections multiply the measured times by.
VOC = dict(network="resnet38_eps", iters=20000, batch=8, crop=448, pseudo_images=10582,
           pseudo_list="train_aug", val_images=1449, image="500x375")
COCO = dict(network="resnet38_eps", iters=256500, batch=16, crop=321, pseudo_images=82081,
            pseudo_list="train", val_images=40137, image="640x480")
SEG_ITERS = 20000                  # DeepLab-v2, both datasets (coco_eps.sh uses the VOC recipe)
TRAIN_WORKERS, INFER_WORKERS = 8, 2   # train.py / infer.py defaults
GPU_24GB_MIB = 23000               # usable memory of the smallest common 24 GB card (an A10: 23,028 MiB)
PACKAGES = [("torchvision", "torchvision"), ("numpy", "numpy"), ("Pillow", "PIL"),
            ("OpenCV", "cv2"), ("imageio", "imageio"), ("tqdm", "tqdm"),
            ("matplotlib", "matplotlib"), ("pytest", "pytest"),
            ("pydensecrf", "pydensecrf.densecrf"), ("pycocotools", "pycocotools")]
ENTRY_POINTS = ["train", "infer", "evaluate", "train_seg", "infer_seg"]
PACKAGES_TO_IMPORT = ["data", "eval", "network", "utils", "tools"]


class GpuCheckError(UserError):
    """The machine cannot run the check as asked; the message says why."""


def get_args_parser():
    p = argparse.ArgumentParser("GPU check: environment and report", add_help=False)
    p.add_argument("action", type=str, choices=["env", "report"],
                   help="env: record versions and import every module (before the steps); "
                        "report: write <out>/gpu_check.md from the steps' outputs")
    p.add_argument("--out", type=Path, required=True,
                   help="the check's output folder (script/gpu_check.sh's OUT)")
    p.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the real check; cpu: the dry run (small nets, quick benchmark)")
    return p


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------
def package_versions() -> Dict[str, Optional[str]]:
    out = {}
    for name, module in PACKAGES:
        try:
            m = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - absent or broken: both mean "not usable"
            out[name] = None
            continue
        top = sys.modules.get(module.split(".")[0], m)
        out[name] = str(getattr(top, "__version__", getattr(m, "__version__", "installed")))
    return out


def import_everything() -> Dict[str, str]:
    """{module: first line of the error} for every project module that fails to import."""
    failed = {}
    names = list(ENTRY_POINTS)
    for pkg in PACKAGES_TO_IMPORT:
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}.")
                  if not m.name.rsplit(".", 1)[-1].startswith("_")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the report names the module and the reason
            failed[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return failed


def collect_env() -> dict:
    import torch

    from tools.benchmarks.measure import cuda_environment
    env = {"time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
           "host": platform.node(), "python": platform.python_version(),
           "platform": platform.platform(), "cores": os.cpu_count(),
           "torch": torch.__version__, "packages": package_versions()}
    env["cuda_env"] = cuda_environment()
    if os.path.isdir("/dev/shm"):
        env["shm_free_mib"] = round(shutil.disk_usage("/dev/shm").free / 2 ** 20)
    return env


def action_env(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    env = collect_env()
    env["import_failures"] = import_everything()
    (args.out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    print(json.dumps(env, indent=1, default=str))
    cuda_env = env["cuda_env"]
    if args.device == "cuda" and not cuda_env.get("cuda"):
        raise GpuCheckError(f"no usable GPU: {cuda_env.get('why')}; for a dry run on the CPU use "
                            f"DEVICE=cpu bash script/gpu_check.sh")
    if env["import_failures"]:
        first = next(iter(env["import_failures"].items()))
        raise GpuCheckError(f"{len(env['import_failures'])} module(s) do not import with torch "
                            f"{env['torch']}, e.g. {first[0]}: {first[1]}")
    return 0


# ------------------------------------------------------------------------------------------------
# reading the steps' outputs
# ------------------------------------------------------------------------------------------------
def read_steps(path: Path) -> List[Dict]:
    """steps.tsv rows: name, status (pass / FAIL / skipped / not run), seconds, note, command."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        rows.append({"name": parts[0], "status": parts[1], "seconds": float(parts[2] or 0),
                     "note": parts[3], "command": parts[4] if len(parts) > 4 else ""})
    return rows


def read_junit(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (el.get("message") or "").splitlines()[0][:140] if el.get("message") else ""
                break
        out.append({"test": case.get("name"), "outcome": outcome,
                    "seconds": float(case.get("time") or 0), "message": message})
    return out


def last_metrics(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    return json.loads(lines[-1]) if lines else None


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def grep_float(path: Path, pattern: str) -> Optional[float]:
    """The first group of the last match of ``pattern`` in a text file, as a float."""
    if not path.is_file():
        return None
    found = re.findall(pattern, path.read_text(errors="replace"))
    return float(found[-1]) if found else None


def step_details(out: Path, name: str) -> str:
    """One line of results for a pipeline step, from its outputs (layout: script/gpu_check.sh)."""
    run = out / "runs" / ("ddp" if name.startswith("ddp_") else "1gpu")
    base = name[4:] if name.startswith("ddp_") else name
    if base == "train":
        m = last_metrics(run / "cls" / "metrics.jsonl")
        if m:
            return (f"{m['iter']} iterations, loss {m['loss']:.3f}, {m['images_per_s']:.1f} img/s, "
                    f"{m['sec_per_iter']:.3f} s/it (last window), peak {m['mem_mb']:.0f} MB")
    if base == "infer":
        s = grep_float(run / "pseudo" / "run" / "log.txt", r"\(([0-9.]+) s/image\)")
        if s is not None:
            return f"{s:.3f} s/image (generated images, scales as in the command)"
    if base == "infer_crf":
        n = len(list((run / "pseudo_crf" / "crf").glob("*.png")))
        return f"{n} CRF pseudo-masks" if n else ""
    if base == "evaluate":
        j = read_json(run / "pseudo" / "train_miou.json")
        if j and "miou" in j:
            return f"pseudo-mask mIoU {100 * j['miou']:.1f} (a few iterations from scratch: checks the stage, not the method)"
    if base == "train_seg":
        m = last_metrics(run / "deeplab" / "metrics.jsonl")
        if m:
            return (f"{m['iter']} iterations, loss {m['loss']:.3f}, {m['images_per_s']:.1f} img/s, "
                    f"{m['sec_per_iter']:.3f} s/it")
    if base in ("infer_seg", "infer_seg_crf"):
        folder = "val" if base == "infer_seg" else "valc"
        s = grep_float(run / "deeplab" / f"{folder}_run" / "log.txt", r"network: ([0-9.]+) s per image")
        j = read_json(run / "deeplab" / f"{folder}_eval.json")
        parts = [f"{s:.3f} s/image" if s is not None else "",
                 f"val mIoU {100 * j['miou']:.1f}" if j and "miou" in j else ""]
        if base == "infer_seg_crf":
            jc = read_json(run / "deeplab" / f"{folder}_crf_eval.json")
            parts.append(f"with CRF {100 * jc['miou']:.1f}" if jc and "miou" in jc else "")
        return ", ".join(p for p in parts if p)
    return ""


# ------------------------------------------------------------------------------------------------
# projections
# ------------------------------------------------------------------------------------------------
def _rows(bench: Optional[dict], section: str, device: str) -> List[dict]:
    rows = ((bench or {}).get("sections", {}).get(section) or {}).get("rows", [])
    return [r for r in rows if r.get("device", device) == device and not r.get("error")]


def _find(rows, **keys) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in keys.items()):
            return r
    return None


def hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "not measured"
    m = int(round(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{seconds / 60:.1f} min"


def measured(bench: Optional[dict], device: str) -> dict:
    """The per-unit times the projections need (None where not measured)."""
    train = _rows(bench, "train", device)
    infer = _rows(bench, "infer", device)
    seg = _rows(bench, "seg", device)
    data = (bench or {}).get("sections", {}).get("data", {}).get("rows", [])
    crf = [r for r in (bench or {}).get("sections", {}).get("seg", {}).get("rows", [])
           if r.get("variant") == "crf" and r.get("sec")]
    m: Dict[str, Optional[dict]] = {}
    for name, recipe in (("voc", VOC), ("coco", COCO)):
        at = [r for r in train if r.get("network") == recipe["network"]
              and r.get("crop") == recipe["crop"] and r.get("batch") == recipe["batch"]
              and r.get("step_s")]
        m[f"{name}_fp32"] = _find(at, variant="default")
        bf16 = [r for r in at if str(r.get("variant", "")).startswith("bf16")]
        m[f"{name}_bf16"] = min(bf16, key=lambda r: r["step_s"]) if bf16 else None
        m[f"{name}_infer"] = _find(infer, variant="default", image=recipe["image"])
    m["seg_train"] = _find(seg, variant="train")
    m["seg_infer_voc"] = _find(seg, variant="infer")
    m["seg_infer_coco"] = _find(seg, variant="infer_coco")
    m["crf"] = crf[0] if crf else None
    m["train_worker"] = _find(data, variant="train_worker")
    m["infer_worker"] = _find(data, variant="infer_worker")
    return m


def project(bench: Optional[dict], device: str, crf_workers: int = 8) -> List[Dict]:
    """Projected wall time of each stage of the full recipes on one GPU of this kind.

    classifier:   iterations x max(step_s, batch / (8 workers x per-worker images/s))
    pseudo-masks: images x max(s/image, 1 / (2 workers x per-worker images/s))
    DeepLab:      20,000 x s/iteration; val: images x s/image (+ images x CRF s / CRF workers)
    """
    m = measured(bench, device)
    tw = m["train_worker"]["images/s"] if m["train_worker"] else None
    iw = m["infer_worker"]["images/s"] if m["infer_worker"] else None
    rows = []

    def add(recipe, stage, count, unit_s, source, bound=""):
        rows.append({"recipe": recipe, "stage": stage, "count": count, "per unit (s)": unit_s,
                     "bound": bound, "projected": hms(count * unit_s if unit_s is not None else None),
                     "seconds": count * unit_s if unit_s is not None else None, "measured by": source})

    for name, recipe in (("VOC", VOC), ("COCO", COCO)):
        key = name.lower()
        for prec in ("fp32", "bf16"):
            r = m[f"{key}_{prec}"]
            step = r["step_s"] if r else None
            bound, unit = "", step
            if step is not None and tw:
                data_s = recipe["batch"] / (TRAIN_WORKERS * tw)
                unit, bound = (step, "GPU") if step >= data_s else (data_s, "data loading")
            flags = r["flags"] if r else ("train.py defaults (fp32)" if prec == "fp32" else "--amp bf16")
            add(name, f"classifier, {flags}", recipe["iters"], unit,
                f"benchmark train: batch {recipe['batch']}, crop {recipe['crop']}", bound)
        r = m[f"{key}_infer"]
        s = r["s/image"] if r else None
        bound, unit = "", s
        if s is not None and iw:
            data_s = 1 / (INFER_WORKERS * iw)
            unit, bound = (s, "GPU") if s >= data_s else (data_s, "data loading")
        add(name, f"pseudo-masks on {recipe['pseudo_list']} (4 scales + flip)",
            recipe["pseudo_images"], unit, f"benchmark infer: default path, {recipe['image']}", bound)
        r = m["seg_train"]
        add(name, "DeepLab-v2 training (5 x 2, crop 321)", SEG_ITERS, r["sec"] if r else None,
            "benchmark seg: training iteration")
        r = m[f"seg_infer_{key}"]
        add(name, "DeepLab-v2 on val (network)", recipe["val_images"], r["sec"] if r else None,
            f"benchmark seg: inference, {recipe['image']}")
        r = m["crf"]
        add(name, f"DeepLab-v2 on val (dense CRF, {crf_workers} processes)", recipe["val_images"],
            r["sec"] / crf_workers if r else None, "benchmark seg: CRF, one process (CPU)")
    return rows


def totals(rows: List[Dict]) -> List[Dict]:
    """Whole recipe per dataset and classifier precision: classifier + every other stage."""
    out = []
    for recipe in ("VOC", "COCO"):
        mine = [r for r in rows if r["recipe"] == recipe]
        others = [r for r in mine if not r["stage"].startswith("classifier")]
        for cls in [r for r in mine if r["stage"].startswith("classifier")]:
            parts = [cls] + others
            known = [r["seconds"] for r in parts if r["seconds"] is not None]
            missing = [r["stage"] for r in parts if r["seconds"] is None]
            if not known:
                total = "not measured"
            elif missing:
                total = f"{hms(sum(known))} + what was not measured ({len(missing)} of {len(parts)} stages)"
            else:
                total = hms(sum(known))
            out.append({"recipe": recipe, "with": cls["stage"], "total": total})
    return out


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def md_table(rows: List[Dict], cols: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment_section(env: Optional[dict], device: str) -> str:
    if not env:
        return "## Environment\n\nnot recorded (the env step did not run)\n"
    c = env.get("cuda_env", {})
    pk = env.get("packages", {})
    rows = [{"": "device under test", " ": device}]
    if c.get("cuda"):
        gpus = c.get("gpus", [])
        rows.append({"": "GPUs", " ": "; ".join(f"{g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, "
                                                 f"{g['memory_mib']} MiB, {g['multiprocessors']} SMs)"
                                                 for g in gpus)})
        rows.append({"": "NVIDIA driver", " ": c.get("driver") or "unknown (no nvidia-smi)"})
        rows.append({"": "CUDA / cuDNN / NCCL", " ": f"{c.get('cuda')} / {c.get('cudnn')} / {c.get('nccl')}"})
    else:
        rows.append({"": "GPUs", " ": f"none usable: {c.get('why')}"})
    rows += [{"": "torch", " ": f"{env.get('torch')} (built for CUDA {c.get('torch_cuda')})"},
             {"": "Python", " ": f"{env.get('python')} on {env.get('platform')}, {env.get('cores')} CPU cores"}]
    rows += [{"": name, " ": v or "not installed"} for name, v in pk.items()]
    shm = env.get("shm_free_mib")
    if shm is not None:
        need = TRAIN_WORKERS * SHM_PER_WORKER_MB
        rows.append({"": "/dev/shm free", " ": f"{shm} MiB: train.py's default {TRAIN_WORKERS} "
                     f"workers need about {need}: " + ("fit" if shm >= need else
                                                       "do NOT fit (start the container with "
                                                       "--shm-size=8g or --ipc=host)")})
    fails = env.get("import_failures") or {}
    rows.append({"": "project modules", " ": "all import" if not fails else
                 f"{len(fails)} fail: " + "; ".join(f"{k}: {v}" for k, v in fails.items())})
    return "## Environment\n\n" + md_table(rows, ["", " "])


def targets_section(bench: Optional[dict], device: str) -> str:
    m = measured(bench, device)
    lines = []
    r = m["voc_fp32"]
    if r and r.get("gpu_need_mb") is not None:
        fits = r["gpu_need_mb"] <= GPU_24GB_MIB
        lines.append(f"- ResNet-38 EPS, batch 8, crop 448, fp32, no checkpointing fits one 24 GB GPU: "
                     f"**{'yes' if fits else 'no'}**: needs {r['gpu_need_mb']:.0f} MiB (peak reserved "
                     f"{r['peak_reserved_mb']:.0f} + CUDA context), budget {GPU_24GB_MIB} MiB.")
    else:
        lines.append("- ResNet-38 EPS batch 8 / crop 448 fp32 memory: not measured.")
    r = m["voc_bf16"]
    if r:
        minutes = VOC["iters"] * r["step_s"] / 60
        lines.append(f"- VOC EPS classifier (20,000 iterations) with `{r['flags']}`: "
                     f"{minutes:.1f} min of GPU steps on this GPU (target: at most 30 min on one "
                     f"H100): **{'met' if minutes <= 30 else 'not met'} on this GPU**.")
    else:
        lines.append("- VOC EPS classifier with --amp bf16: not measured.")
    data = (bench or {}).get("sections", {}).get("data", {}).get("rows", [])
    head = [r for r in data if r.get("headroom") is not None]
    if head:
        for r in head:
            lines.append(f"- data loading, {r['pipeline']}: {r['images/s']:.0f} img/s from {r['workers']} "
                         f"workers vs {r['GPU images/s']:.1f} img/s ({r['GPU consumer']}): "
                         f"headroom {r['headroom']:.1f}x, {r['target']}.")
    else:
        lines.append("- data-loading headroom: no GPU rate to compare with.")
    return "## Targets (from the GPU/cluster issue)\n\n" + "\n".join(lines) + "\n"


def projection_section(bench: Optional[dict], device: str, dry: bool) -> str:
    rows = project(bench, device)
    note = ("**CPU dry run: these numbers are not GPU numbers; most are not measured by the quick "
            "benchmark.**\n\n" if dry else "")
    return ("## Projected wall time of the full recipes on one of these GPUs\n\n" + note +
            "From the benchmark's medians (batch and crop of the recipe), per stage:\n\n"
            "- classifier = iterations x max(step s, batch / (8 workers x 1-worker images/s))\n"
            "- pseudo-masks = images x max(s/image, 1 / (2 workers x 1-worker images/s))\n"
            "- DeepLab = 20,000 x s/iteration; val = images x s/image (+ images x CRF s / 8 CRF "
            "processes)\n\n"
            "`bound` says which side limits a stage. Not included: start-up, dataset checks, "
            "checkpoint writes (every 1,000 iterations), evaluation, DeepLab's data loading (not "
            "measured). The COCO classifier's data bound uses the VOC transform's rate (COCO's "
            "321 crop from a <= 448 resize costs less per image, so this is conservative). Several "
            "GPUs divide the training and inference stages by at most their number.\n\n" +
            md_table(rows, ["recipe", "stage", "count", "per unit (s)", "bound", "projected",
                            "measured by"]) + "\n" +
            md_table(totals(rows), ["recipe", "with", "total"]))


def pipeline_summary(cls: dict, seg: dict) -> str:
    """What the pipeline steps ran (from their args.json): generated data, small sizes."""
    text = "Pipeline steps on generated data (a functional check; the benchmark measures speed): "
    if cls:
        text += (f"classifier `{cls.get('network')}` from scratch, crop {cls.get('crop_size')}, "
                 f"batch {cls.get('batch_size')}, {cls.get('max_iters')} iterations")
    if seg:
        text += ("; " if cls else "") + (
            f"DeepLab `{seg.get('arch')}` (--init {seg.get('init')}), crop {seg.get('crop_size')}, "
            f"{seg.get('batch_size')} x {seg.get('iter_size')}, {seg.get('max_iters')} iterations")
    return text + ".\n"


def render(out: Path, device: str) -> Tuple[str, int]:
    env = read_json(out / "env.json")
    steps = read_steps(out / "steps.tsv")
    tests = read_junit(out / "pytest_cuda.xml")
    bench = read_json(out / "benchmark.json")
    bad = [s for s in steps if s["status"] in ("FAIL", "not run")]
    dry = device == "cpu"
    gpu = ""
    if env and env.get("cuda_env", {}).get("gpus"):
        names = [g["name"] for g in env["cuda_env"]["gpus"]]
        gpu = f" on {len(names)} x {names[0]}" if len(set(names)) == 1 else " on " + ", ".join(names)
    title = "GPU check" + (" (CPU dry run)" if dry else "") + gpu
    verdict = (f"**{len(bad)} of {len(steps)} steps failed or did not run**: "
               + ", ".join(s["name"] for s in bad) if bad else
               f"**all {len(steps)} steps passed or were skipped for a stated reason**")
    total = sum(s["seconds"] for s in steps)
    parts = [f"# {title}\n",
             f"{(env or {}).get('time', '')} on {(env or {}).get('host', '?')}: {verdict}, "
             f"{total / 60:.1f} min of steps. Logs: `{out}/logs/<step>.log`.\n"]
    cls = read_json(out / "runs" / "1gpu" / "cls" / "args.json") or {}
    seg = read_json(out / "runs" / "1gpu" / "deeplab" / "args.json") or {}
    if dry:
        # networks trained from scratch here stand in for the ImageNet-initialised ones
        from network import network_parts
        small = not network_parts(cls.get("network", "small_eps"))[0].expects_pretrained
        parts.append("A dry run on the CPU: "
                     + ("small networks (small_eps, deeplabv2_small) instead of ResNet-38 / "
                        "ResNet-101, which are too slow on a few CPU cores; " if small else "")
                     + "a couple of iterations; the CUDA tests are skipped; the benchmark is the "
                       "quick data section. It checks the script, the steps and this report, not "
                       "a GPU.\n")
    if cls or seg:
        parts.append(pipeline_summary(cls, seg))
    parts.append(environment_section(env, device))
    for s in steps:
        s["details"] = s["note"] if s["status"] != "pass" else step_details(out, s["name"])
        if s["name"] == "tests" and tests:
            counts = {}
            for t in tests:
                counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
            s["details"] = ", ".join(f"{v} {k}" for k, v in counts.items()) + \
                ("; " + s["note"] if s["status"] != "pass" and s["note"] else "")
        if s["name"] == "benchmark" and s["status"] == "pass":
            s["details"] = "tables below"
    parts.append("## Steps\n\n" + md_table(steps, ["name", "status", "seconds", "details"]))
    if tests:
        reasons = {t["message"] for t in tests}
        if all(t["outcome"] == "skipped" for t in tests) and len(reasons) <= 2:
            text = "\n".join(f"- {sum(t['message'] == r for t in tests)} skipped: {r}" for r in reasons)
            parts.append(f"## CUDA tests (tests/test_cuda.py)\n\n{text}\n")
        else:
            parts.append("## CUDA tests (tests/test_cuda.py)\n\n" +
                         md_table(tests, ["test", "outcome", "seconds", "message"]))
    parts.append(targets_section(bench, device))
    parts.append(projection_section(bench, device, dry))
    bench_md = out / "benchmark.md"
    if bench_md.is_file():
        text = bench_md.read_text()
        text = re.sub(r"^# Benchmarks\n", "", text)
        parts.append("## Benchmark (tools/benchmark.py)\n\n" + re.sub(r"^## ", "### ", text, flags=re.M))
    else:
        parts.append("## Benchmark\n\nno results (the benchmark step failed or did not run)\n")
    parts.append("## Commands\n\n" + "\n".join(f"- {s['name']}: `{s['command']}`" for s in steps
                                                if s["command"]) + "\n")
    return "\n".join(parts), (1 if bad or not steps else 0)


def action_report(args) -> int:
    text, status = render(args.out, args.device)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return status


def main(args):
    return action_env(args) if args.action == "env" else action_report(args)


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__, exit_code=lambda status: status))
