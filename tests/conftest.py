"""Shared pytest set-up: keep PyTorch polite on a 2-core machine and make the repo importable."""
import os
import sys
from pathlib import Path

# Without a passive OpenMP wait policy, PyTorch on 2 cores can run 40x slower next to another
# busy process (see ../shared/docs/environment.md). Subprocesses inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
