"""Segmentation evaluation: confusion-matrix metrics (pure numpy), folder evaluation with worker
processes, and CAM threshold sweeps. The command line is ``evaluate.py`` at the repository root."""
from eval.cam_sweep import evaluate_cams, thresholds_from_range
from eval.evaluator import EvalError, evaluate_folders, read_label_png
from eval.metrics import (compute_scores, confusion_matrix, format_table, scores_to_json,
                          sweep_confusion_matrices)

__all__ = ["EvalError", "compute_scores", "confusion_matrix", "evaluate_cams",
           "evaluate_folders", "format_table", "read_label_png", "scores_to_json",
           "sweep_confusion_matrices", "thresholds_from_range"]
