"""Benchmark sections, registered explicitly: name -> run(args) -> (title, rows). They run in
this order: "data" compares the DataLoader workers with the CUDA rows of "train" and "infer"."""
from tools.benchmarks import data as data_bench
from tools.benchmarks import eval as eval_bench
from tools.benchmarks import infer as infer_bench
from tools.benchmarks import network as network_bench
from tools.benchmarks import published as published_bench
from tools.benchmarks import seg as seg_bench
from tools.benchmarks import train as train_bench

SECTIONS = {
    "eval": eval_bench.run,
    "network": network_bench.run,
    "train": train_bench.run,
    "infer": infer_bench.run,
    "seg": seg_bench.run,
    "published": published_bench.run,
    "data": data_bench.run,
}
