"""Tiny ONNX models that stand in for rembg's downloads in the tests (nothing is downloaded):
written with the ``onnx`` helper API, random weights, in milliseconds."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _model(nodes, inits, in_shape, out_shape, path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
        initializer=[helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.flatten().tolist())
                     for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return Path(path)


def saliency_onnx(path, size: int = 320, seed: int = 0, sigmoid: bool = True,
                  constant: bool = False, dynamic: bool = False) -> Path:
    """1x3xSxS -> 1x1xSxS: conv 3->4 (3x3) -> ReLU -> conv 4->1 (3x3) [-> Sigmoid], random
    weights. ``constant``: zero weights, so every pixel gets the same value."""
    from onnx import helper
    rng = np.random.default_rng(seed)
    scale = 0.0 if constant else 1.0
    inits = {"w1": (rng.normal(0, 0.5, (4, 3, 3, 3)) * scale).astype(np.float32),
             "b1": rng.normal(0, 0.1, 4).astype(np.float32),
             "w2": (rng.normal(0, 0.5, (1, 4, 3, 3)) * scale).astype(np.float32),
             "b2": np.array([0.3], np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["logit" if sigmoid else "output"],
                              pads=[1, 1, 1, 1])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["output"]))
    side = ["h", "w"] if dynamic else [size, size]
    return _model(nodes, inits, [1, 3, *side], [1, 1, *side], path)


def classifier_onnx(path, size: int = 224, classes: int = 10, seed: int = 0) -> Path:
    """1x3xSxS -> 1xK (global average pooling and a linear layer): not a saliency model."""
    from onnx import helper
    rng = np.random.default_rng(seed)
    inits = {"w": rng.normal(0, 1, (3, classes)).astype(np.float32)}
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["output"])]
    return _model(nodes, inits, [1, 3, size, size], [1, classes], path)


def shapes_onnx(path, in_shape: Sequence[int], out_shape: Sequence[int]) -> Path:
    """A model with the given declared input / output shapes (identity-like via Slice-free ops):
    mean over channels, for shape-check tests only."""
    from onnx import helper
    nodes = [helper.make_node("ReduceMean", ["input"], ["output"], axes=[1], keepdims=1)]
    return _model(nodes, {}, in_shape, out_shape, path)
