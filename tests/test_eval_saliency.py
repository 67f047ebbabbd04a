"""Saliency-map metrics (eval/saliency.py) against hand-computed values, and tools/eval_saliency.py
on the demo dataset, whose saliency maps have known, recorded flaws (saliency_flaws.txt)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import saliency as sm
from tools import eval_saliency as es
from tools.make_demo_dataset import CLASS_NAMES, read_saliency_flaws

REPO = Path(__file__).resolve().parents[1]

# 2 x 3 example: values of the map, and the ground truth (0 bg, 1/2 classes, 255 ignore)
SAL = np.array([[0, 100, 200], [255, 128, 127]], np.uint8)
GT = np.array([[0, 1, 1], [2, 0, 255]], np.uint8)


def test_f_beta_by_hand():
    assert sm.f_beta(0.5, 1.0) == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1.0))
    assert sm.f_beta(0.0, 0.0) == 0.0
    assert sm.f_beta(0.8, 0.8) == pytest.approx(0.8)  # P = R gives F = P for any beta


def test_one_image_by_hand():
    s = sm.image_scores("x", SAL, GT)
    # valid pixels: all but the 255; foreground: 100, 200 (class 1) and 255 (class 2)
    assert s.fg_pixels == 3
    assert s.mae == pytest.approx((0 + 155 / 255 + 55 / 255 + 0 + 128 / 255) / 5)
    precision, recall = sm.pr_curves(SAL, *sm.masks(GT)[::-1])
    # t = 0: everything predicted (3 TP, 2 FP); t = 1..100: 100, 128, 200, 255 (3 TP, 1 FP);
    # t = 101..128: 128, 200, 255 (2 TP, 1 FP); t = 129..200: 200, 255; t = 201..255: 255
    for t, p, r in [(0, 3 / 5, 1), (1, 3 / 4, 1), (100, 3 / 4, 1), (101, 2 / 3, 2 / 3),
                    (128, 2 / 3, 2 / 3), (129, 1, 2 / 3), (200, 1, 2 / 3), (201, 1, 1 / 3),
                    (255, 1, 1 / 3)]:
        assert (precision[t], recall[t]) == pytest.approx((p, r)), t
    assert s.max_f == pytest.approx(1.3 * (2 / 3) / (0.3 + 2 / 3))     # at t = 129..200
    assert s.f_eps == pytest.approx(2 / 3)                             # EPS: v >= 128
    assert (s.precision_eps, s.recall_eps) == pytest.approx((2 / 3, 2 / 3))
    # coverage: class 1 has 100 (not salient for EPS) and 200 (salient); class 2 has 255
    assert s.classes == {1: (2, 1), 2: (1, 1)}
    assert s.coverage(1) == 0.5 and s.coverage(2) == 1.0
    # the 128 on background touches the 255 of class 2 (8-connected): not a spurious region
    assert (s.spurious, s.spurious_pixels) == (0, 0)


def test_eps_threshold_is_the_rounding_of_the_loss():
    """The EPS loss rounds v / 255 half to even: 127 -> 0, 128 -> 1."""
    import torch
    v = torch.arange(256, dtype=torch.float32) / 255
    assert int(torch.nonzero(torch.round(v)).min()) == sm.EPS_SALIENT_MIN


def test_image_without_foreground_is_out_of_the_f_measures():
    s = sm.image_scores("bg", np.full((2, 2), 200, np.uint8), np.zeros((2, 2), np.uint8))
    assert np.isnan(s.max_f) and np.isnan(s.f_eps) and s.mae == pytest.approx(200 / 255)
    good = sm.image_scores("x", SAL, GT)
    summary = sm.summarize([s, good], ["one", "two"])
    assert summary.num_images == 2 and summary.num_scored == 1
    assert summary.f_eps == pytest.approx(good.f_eps)
    assert summary.mae == pytest.approx((s.mae + good.mae) / 2)


def test_spurious_regions_ignore_the_halo_cut_off_by_the_ignore_band():
    gt = np.zeros((7, 9), np.uint8)
    gt[2:5, 1:4] = 1
    gt[1, 1:4] = 255                       # ignore band above the object
    sal = np.zeros((7, 9), np.uint8)
    sal[0:5, 1:4] = 200                    # object, band and a halo above the band
    sal[5:7, 7:9] = 255                    # a blob far from the object
    valid = gt != 255
    n, px = sm.spurious_regions(sal >= 128, gt != 0, valid)
    assert (n, px) == (1, 4)


def test_summary_mean_curve_missed_objects_and_uncovered_classes():
    a = sm.image_scores("a", SAL, GT)
    sal_b = np.array([[0, 250, 250], [0, 0, 0]], np.uint8)   # class 2 entirely missed
    b = sm.image_scores("b", sal_b, GT)
    s = sm.summarize([a, b], ["one", "two"], miss_below=0.8, tau=0.4)
    curve = (a.f_curve + b.f_curve) / 2
    assert s.max_f == pytest.approx(curve.max()) and s.max_f_threshold == int(np.argmax(curve))
    assert s.missed == [("b", "two", 0.0), ("a", "one", 0.5)]
    one, two = s.classes
    assert (one.pixels, one.salient, one.missed, one.below_tau) == (4, 3, 1, 0)
    assert (two.pixels, two.salient, two.missed, two.below_tau) == (2, 1, 1, 1)
    assert s.uncovered_classes() == []
    s = sm.summarize([b], ["one", "two"], tau=0.4)
    assert [c.name for c in s.uncovered_classes()] == ["two"]


# ------------------------------------------------------------------------------------------------
# the tool on the demo dataset
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("salEval") / "demo"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_dataset.py"), "--out",
                    str(root), "--num-train", "150", "--num-val", "4"], check=True,
                   capture_output=True)
    return root


def run(root: Path, *extra):
    argv = ["--data-root", str(root), "--list", "train", "--workers", "1", "--no-progress",
            *map(str, extra)]
    return es.main(es.get_args_parser().parse_args(argv))


def test_demo_report_flags_the_deliberately_missed_objects(demo, tmp_path, capsys):
    result = run(demo, "--out", tmp_path / "report.md")
    flaws = read_saliency_flaws(demo / "saliency_flaws.txt")
    damaged = {(i, f.split("=")[1]) for i, fs in flaws.items() for f in fs if f.startswith("missed=")}
    summary = result["results"][0][2]
    flagged = {(i, name) for i, name, _ in summary.missed}
    assert damaged and flagged == damaged  # every damaged object, and nothing else
    # false blobs: every image with a spurious salient region has one (blobs whose peak stays
    # under 128 are invisible to EPS and rightly not reported)
    blobs = {i for i, fs in flaws.items() if "false_blob" in fs}
    spurious = {i for i, _, _ in summary.spurious_images}
    assert spurious and spurious <= blobs and len(spurious) >= 0.5 * len(blobs)
    assert 0 < summary.mae < 0.1 and 0.85 < summary.f_eps <= summary.max_f < 1
    out = capsys.readouterr().out
    assert f"{len(damaged)} of " in out and "objects have less than 80% of their pixels" in out
    assert "| train |" in out and "NOT COVERED" not in out
    # the files: markdown, JSON with every figure, and a per-image CSV
    assert (tmp_path / "report.md").read_text() == result["report"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["maps"][0]["f_eps"] == pytest.approx(summary.f_eps)
    assert len(data["per_image"]) == 150
    rows = (tmp_path / "report_per_image.csv").read_text().splitlines()
    assert rows[0].startswith("id,mae,max_f,f_eps") and len(rows) == 151
    some_id, some_class = sorted(damaged)[0]
    assert any(r.startswith(some_id + ",") and some_class in r for r in rows)
    # no overwrite of a finished report: of any of its files, the .md gone or not
    with pytest.raises(es.SaliencyEvalError, match="report.md, .*report.json, .*report_per_image.csv "
                                                   r"exist\(s\) .*pass --overwrite"):
        run(demo, "--out", tmp_path / "report.md")
    (tmp_path / "report.md").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.glob("report*")}
    with pytest.raises(es.SaliencyEvalError, match=r"report.json, .*report_per_image.csv exist\(s\)"):
        run(demo, "--out", tmp_path / "report.md")
    (tmp_path / "report.json").unlink()
    with pytest.raises(es.SaliencyEvalError, match=r": \S*report_per_image.csv exist\(s\)"):
        run(demo, "--out", tmp_path / "report.md")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("report*")} == {
        "report_per_image.csv": before["report_per_image.csv"]}
    run(demo, "--out", tmp_path / "report.md", "--overwrite")
    assert sorted(p.name for p in tmp_path.glob("report*")) == [
        "report.json", "report.md", "report_per_image.csv"]
    # a report named like its own summary would be overwritten by it
    with pytest.raises(es.SaliencyEvalError, match=r"--out \S*r.json: the JSON summary is written "
                                                   r"beside the report as"):
        run(demo, "--out", tmp_path / "r.json")


def test_a_class_the_maps_never_cover_is_flagged(demo, tmp_path, caplog, capsys):
    """Maps that never call a kite salient: EPS cannot learn kites from them, and the report says
    so by class, next to the intact maps (--compare)."""
    blank = tmp_path / "no_kites"
    blank.mkdir()
    kite = CLASS_NAMES.index("kite") + 1
    ids = (demo / "train.txt").read_text().split()
    for i in ids:
        sal = np.array(Image.open(demo / "SALImages" / f"{i}.png"))
        gt = np.array(Image.open(demo / "SegmentationClassAug" / f"{i}.png"))
        sal[gt == kite] = 0
        Image.fromarray(sal).save(blank / f"{i}.png")
    result = run(demo, "--maps", blank, "--name", "no_kites", "--compare",
                 f"intact={demo / 'SALImages'}")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| kite |"))
    assert "NOT COVERED" in row and "0.0%" in row
    assert "| no_kites |" in out and "| intact |" in out
    summary = result["results"][0][2]
    assert [c.name for c in summary.uncovered_classes()] == ["kite"]
    assert any("class kite" in r.message and "cannot learn" in r.message for r in caplog.records)


def test_bad_input_is_one_line_before_any_output(demo, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    (copy / "SALImages" / "train_00003.png").unlink()
    with pytest.raises(es.SaliencyEvalError, match=r"1 of 150 ids have no map in .*train_00003"):
        run(copy, "--out", tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()
    assert run(copy, "--skip-missing")["results"][0][2].num_images == 149
    Image.new("L", (50, 96)).save(copy / "SALImages" / "train_00003.png")
    with pytest.raises(es.SaliencyEvalError, match="train_00003.png is 50x96.*another aspect"):
        run(copy)
    # a map at half resolution is resized to the mask, as training resizes it
    Image.open(demo / "SALImages" / "train_00003.png").resize((48, 48)).save(
        copy / "SALImages" / "train_00003.png")
    assert run(copy)["results"][0][2].num_images == 150
    (copy / "SegmentationClassAug" / "train_00005.png").unlink()
    with pytest.raises(es.SaliencyEvalError, match="1 of 150 ids have no ground-truth mask"):
        run(copy)


def test_voc_report_puts_pfan_beside_the_users_maps(tmp_path, capsys):
    """--dataset voc12: PFAN's SALImages/ joins the report by itself when --maps is another
    folder (the real VOC ids and class names, generated pixels)."""
    ids = (REPO / "metadata" / "voc12" / "val.txt").read_text().split()[:3]
    root = tmp_path / "VOC2012"
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClassAug", "SALImages", "SALImages_u2net"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        gt = np.zeros((20, 30), np.uint8)
        gt[5:15, 5:20] = 15  # person
        Image.fromarray(gt).save(root / "SegmentationClassAug" / f"{i}.png")
        Image.fromarray((gt > 0).astype(np.uint8) * 255).save(root / "SALImages" / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(
            root / "SALImages_u2net" / f"{i}.png")
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    result = es.main(es.get_args_parser().parse_args(
        ["--dataset", "voc12", "--data-root", str(root), "--list", str(tmp_path / "ids.txt"),
         "--maps", str(root / "SALImages_u2net"), "--workers", "1", "--no-progress"]))
    names = [n for n, _, _ in result["results"]]
    assert names == ["SALImages_u2net", "PFAN"]
    pfan = result["results"][1][2]
    assert pfan.mae == 0 and pfan.f_eps == 1.0
    out = capsys.readouterr().out
    assert "| PFAN |" in out and "| person |" in out


def test_message_examples_and_file_hashes_have_one_place(tmp_path):
    """The "a; b; ... and N more" of the one-line errors (utils/errors.py) and a file's sha256
    (utils/fetch.py) are each written once, and the tools use those."""
    import hashlib
    from data import datasets, saliency
    from tools import convert_resnet38, make_saliency
    from utils import errors, fetch
    assert errors.examples(range(7)) == "0; 1; 2; 3; 4; ... and 2 more"
    assert errors.examples(iter(["a", "b"])) == "a; b" and errors.examples([]) == ""
    assert errors.examples(range(4), n=2) == "0; 1; ... and 2 more"
    for module in (es, make_saliency, datasets, saliency):
        assert module.examples is errors.examples and not hasattr(module, "_examples")
    (tmp_path / "f").write_bytes(b"eps" * 1000)
    assert fetch.sha256_of(tmp_path / "f") == hashlib.sha256(b"eps" * 1000).hexdigest()
    assert make_saliency.sha256_of is convert_resnet38.sha256_of is fetch.sha256_of
    from utils import provenance
    assert not hasattr(provenance, "sha256_of")  # its file identities hash through fetch too
