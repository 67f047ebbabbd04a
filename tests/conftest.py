"""Shared pytest set-up: keep PyTorch polite on a 2-core machine, make the repo importable, and
skip the tests marked ``cuda`` where no GPU can run them."""
import os
import sys
from pathlib import Path

import pytest

# Without a passive OpenMP wait policy, PyTorch on 2 cores can run 40x slower next to another
# busy process (see ../shared/docs/environment.md). Subprocesses inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, when CUDA cannot be used here (no GPU
    on the development and CI machines; script/gpu_check.sh runs them where there is one)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    from utils.device import cuda_problem  # imports torch: only when a cuda test was collected
    problem = cuda_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {problem}")
    for item in marked:
        item.add_marker(skip)
