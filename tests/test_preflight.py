"""tools/preflight.py as a library: each stage's inputs are named when missing, before compute.

The pipeline scripts' use of it (whole plans, refused process counts) is in test_scripts.py."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from preflight import preflight  # noqa: E402
from test_train import make_tiny_dataset  # noqa: E402


def _problems(groups, procs=None):
    stages = preflight(groups, nodes=1, procs=procs or {"*": 1}, device="cpu")
    return [p for s in stages for p in s.problems]


def test_seg_inference_weights_given_as_a_run_directory(tmp_path):
    """--weights may be train_seg.py's run directory: preflight looks for its
    checkpoint_final.pth there (and names that file when it is missing)."""
    root = make_tiny_dataset(tmp_path / "data", n=4)
    run_dir = tmp_path / "deeplab"
    run_dir.mkdir()
    argv = ["--dataset", "custom", "--data_root", str(root), "--list", "train",
            "--weights", str(run_dir), "--out-dir", str(tmp_path / "out"), "--no-evaluate"]
    problems = _problems([("segeval", "infer_seg.py", argv)])
    assert len(problems) == 1 and str(run_dir / "checkpoint_final.pth") in problems[0], problems
    (run_dir / "checkpoint_final.pth").write_bytes(b"")
    assert _problems([("segeval", "infer_seg.py", argv)]) == []


def test_an_earlier_stage_that_makes_an_input_satisfies_it(tmp_path):
    """The seg stage's checkpoint is made by the stage before it in the same plan: not missing."""
    root = make_tiny_dataset(tmp_path / "data", n=4)
    masks = tmp_path / "masks"
    masks.mkdir()
    seg = ["--dataset", "custom", "--data_root", str(root), "--train-list", "train",
           "--mask-dir", str(masks), "--init", "none", "--run-dir", str(tmp_path / "deeplab"),
           "--batch-size", "2", "--max-iters", "2"]
    segeval = ["--dataset", "custom", "--data_root", str(root), "--list", "train",
               "--weights", str(tmp_path / "deeplab"), "--out-dir", str(tmp_path / "out"),
               "--no-evaluate"]
    assert _problems([("seg", "train_seg.py", seg), ("segeval", "infer_seg.py", segeval)]) == []
