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


_HIDE = '''"""Written by tests/conftest.py: make the modules named in HIDDEN_MODULES unimportable, as on a
machine where they are not installed."""
import os
import sys

_hidden = set(os.environ.get("HIDDEN_MODULES", "").split())


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Hide())
'''


@pytest.fixture
def hide_modules(tmp_path):
    """env = hide_modules("pytest", ...): an environment for a subprocess whose Python cannot
    import those modules (a sitecustomize.py on PYTHONPATH), e.g. a bare GPU machine without
    pytest, or a shell outside the project's environment."""
    shim = tmp_path / "hide_modules"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_HIDE)

    def env(*names, base=None):
        base = dict(os.environ if base is None else base)
        path = os.pathsep.join(p for p in (str(shim), base.get("PYTHONPATH", "")) if p)
        return dict(base, PYTHONPATH=path, HIDDEN_MODULES=" ".join(names))
    return env


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Entry points called in-process (main(args)) add a console handler and a run's log file to
    the root logger; drop and close them after each test so that a later test's records neither
    reach an earlier test's run directory nor keep its files open."""
    import logging
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before
                    and not type(h).__module__.startswith("_pytest")]:  # pytest's own per phase
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
