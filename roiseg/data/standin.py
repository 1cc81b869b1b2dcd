"""A small stand-in extractor ONNX with the real model's interface (for tests and the demo).

Input ``images [1,3,640,640]`` (RGB, 0-1); an inner tensor ``/model.34/Concat_output_0`` of shape
``[1,C,H/8,W/8]`` (a fixed patch convolution and its local average, concatenated); and a final
output computed from it, so the feature tensor is *not* a graph output, as in the real file.  An
early stride-4 tensor ``FINE_NAME`` ``[1,8,H/4,W/4]`` stands in for the real model's early layers
(``cache --fine-feature``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from roiseg.data.cache_config import DEFAULT_FEATURE

FEATURE_NAME = DEFAULT_FEATURE      # the stand-in exposes the real model's tensor name
FINE_NAME = "/model.3/act"          # stride 4, 8 channels


def build_standin_extractor(path: str | Path, channels: int = 1024, input_size: int = 640,
                            dynamic_batch: bool = False, seed: int = 0, opset: int = 17) -> Path:
    if channels % 2:
        raise ValueError("channels must be even")
    rng = np.random.default_rng(seed)
    half = channels // 2
    # Patch-embedding weights: random projections of 8x8 RGB patches plus centred colour filters.
    w1 = rng.normal(0, 1.0 / np.sqrt(192), (half, 3, 8, 8)).astype(np.float32)
    w1[: min(half, 24)] += rng.normal(0, 0.15, (min(half, 24), 3, 1, 1)).astype(np.float32)
    b1 = rng.normal(0, 0.05, half).astype(np.float32)
    w_head = rng.normal(0, 0.05, (8, channels, 1, 1)).astype(np.float32)
    w_fine = rng.normal(0, 1.0 / np.sqrt(48), (8, 3, 4, 4)).astype(np.float32)
    batch = "N" if dynamic_batch else 1
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "patch.w"), (b1, "patch.b"), (w_head, "head.w"),
              (np.array([0.5], np.float32), "centre"), (w_fine, "fine.w"))]
    nodes = [
        helper.make_node("Sub", ["images", "centre"], ["/model.0/centred"], name="/model.0/Sub"),
        helper.make_node("Conv", ["/model.0/centred", "patch.w", "patch.b"], ["/model.1/conv"],
                         kernel_shape=[8, 8], strides=[8, 8], name="/model.1/Conv"),
        helper.make_node("Relu", ["/model.1/conv"], ["/model.1/act"], name="/model.1/Relu"),
        helper.make_node("AveragePool", ["/model.1/act"], ["/model.2/pool"], kernel_shape=[5, 5],
                         pads=[2, 2, 2, 2], strides=[1, 1], count_include_pad=0, name="/model.2/Pool"),
        helper.make_node("Concat", ["/model.1/act", "/model.2/pool"], [FEATURE_NAME], axis=1,
                         name="/model.34/Concat"),
        helper.make_node("Conv", [FEATURE_NAME, "head.w"], ["/model.35/head"], name="/model.35/Conv"),
        helper.make_node("GlobalAveragePool", ["/model.35/head"], ["output0"], name="/model.36/GAP"),
        # an early stride-4 layer (not used by the head: only `cache --fine-feature` exposes it)
        helper.make_node("Conv", ["/model.0/centred", "fine.w"], ["/model.3/conv"], kernel_shape=[4, 4],
                         strides=[4, 4], name="/model.3/Conv"),
        helper.make_node("Relu", ["/model.3/conv"], [FINE_NAME], name="/model.3/Relu"),
    ]
    graph = helper.make_graph(
        nodes, "standin_featext",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, input_size, input_size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 8, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="roiseg.data.standin")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_constant_output(src: str | Path, dst: str | Path, name: str, value: np.ndarray) -> Path:
    """Copy of extractor ``src`` with an extra graph output ``name`` = ``value`` (a fixed
    "detection head" for tests of detection decoding: known boxes in, the same boxes out)."""
    model = onnx.load(str(src))
    model.graph.node.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(value, np.float32), f"{name}__value")))
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(np.shape(value))))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)
