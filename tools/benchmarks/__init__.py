"""Benchmark sections, registered explicitly: name -> run(args) -> (title, rows)."""
from tools.benchmarks import eval as eval_bench

SECTIONS = {
    "eval": eval_bench.run,
}
