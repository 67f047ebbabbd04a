"""Dataset code shared by every entry point (train.py, infer.py, evaluate.py, train_seg.py)."""
