"""DistributedDataParallel through torchrun: 2 CPU processes (gloo) against one process.

With --freeze-bn the small net has no batch-dependent layer (BN uses its running statistics,
small_eps has no dropout), so the 2 x 2 split of a global batch of 4 must give the same losses
and, up to float rounding, the same weights as one process with batch 4: DDP averages the two
ranks' gradients, and each loss is a mean over equally sized halves. With BN in training mode
each rank would normalise with its own half-batch statistics (no SyncBN) and the runs differ.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import base_argv, final_state, make_tiny_dataset, run_main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_processes_match_one(tmp_path):
    root = make_tiny_dataset(tmp_path / "data", n=12)
    argv = lambda session: base_argv(root, tmp_path / "runs", network="small_eps", session=session,
                                     iters=3, freeze_bn=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py")] + argv("ddp")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    ddp_dir = tmp_path / "runs" / "ddp"
    log = (ddp_dir / "log.txt").read_text()
    assert "2 process(es)" in log and "per-process batch 2" in log
    assert "weights identical on all 2 ranks" in log

    single_dir = run_main(argv("single"))
    load = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    rd, rs = load(ddp_dir), load(single_dir)
    assert [x["iter"] for x in rd] == [x["iter"] for x in rs] == [1, 2, 3]
    for a, b in zip(rd, rs):
        for key in ("loss", "loss_cls", "loss_sal"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["iter"], key)
    sd, ss = final_state(ddp_dir), final_state(single_dir)
    assert not any(k.startswith("module.") for k in sd)
    for k in ss:
        torch.testing.assert_close(sd[k], ss[k], rtol=1e-4, atol=1e-6, msg=k)
