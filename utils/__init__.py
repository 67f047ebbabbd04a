"""Small runtime helpers shared by the entry points: atomic I/O, run directories, distributed."""
