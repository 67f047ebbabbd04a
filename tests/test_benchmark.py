"""The benchmark driver runs a section and prints a markdown table with the machine header
(no timing assertions: targets live in the benchmark's output, not in tests)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_prints_markdown_tables(tmp_path):
    out = tmp_path / "bench.md"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "tools/benchmark.py", "--only", "eval", "--quick",
                           "--threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "torch " in text and "threads 1" in text
    assert "## Evaluator" in text
    assert "| task | workers | images | seconds | images/s |" in text
