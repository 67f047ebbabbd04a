"""Benchmark sections, registered explicitly: name -> run(args) -> (title, rows)."""
SECTIONS = {}
