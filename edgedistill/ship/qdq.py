"""Explicit INT8 (Q/DQ) by TensorRT's rules ("Explicit Quantization" in NVIDIA's TensorRT developer guide), which
TensorRT builds without a calibrator:

- symmetric INT8: every Q/DQ has an INT8 zero point of 0, scale = amax / 127;
- the inputs of the weighted layers (Conv, Gemm) are quantized per tensor, their weights per output channel (axis 0);
- biases stay in floating point (TensorRT folds them itself; its parser rejects an INT32 bias Q/DQ);
- the residual input of an Add that follows a quantized convolution is quantized too, so that TensorRT can fuse
  the addition into that convolution;
- a layer left without Q/DQ runs in higher precision (FP16 when the engine allows it).

Activation ranges come from ONNX Runtime's calibrators (MinMax, Entropy, Percentile) on the bundle's calibration
images; ``qdq_violations`` checks a graph against these rules.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

QUANTIZED_OPS = ("Conv", "Gemm")

INT8_MAX = 127.0

MIN_AMAX = 1e-8

CALIBRATION_OPS = ("Conv", "Gemm", "Add")


# ------------------------------------------------------------------------------------------------- calibration
class CalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over model-ready batches."""

    def __init__(self, batches: np.ndarray, batch: int, input_name: str = "input"):
        self.batches, self.batch, self.input_name, self.i = batches, batch, input_name, 0

    def get_next(self):
        if self.i + self.batch > len(self.batches):
            return None
        chunk = np.ascontiguousarray(self.batches[self.i : self.i + self.batch])
        self.i += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.i = 0


def activation_ranges(fp32_path: Path, calib: np.ndarray, batch: int, method: str, workdir: Path) -> dict[str, float]:
    """amax (the largest magnitude kept) of every input and output of the Conv, Gemm and Add nodes, from ONNX Runtime's
    calibrator (``minmax``, ``entropy`` or ``percentile``) run on the calibration batches."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    chosen = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    # histograms as TensorRT's own calibrators use them: 2048 bins, entropy searches thresholds quantized to 128 bins
    # (ONNX Runtime's defaults of 128 and 128 leave its KL search one candidate, the maximum), symmetric ranges
    extra = {
        "symmetric": True,
        **({"num_bins": 2048, "num_quantized_bins": 128} if method == "entropy" else {}),
        **({"num_bins": 2048, "percentile": 99.999} if method == "percentile" else {}),
    }
    augmented = Path(workdir) / "calibration.augmented.onnx"
    calibrator = create_calibrator(
        str(fp32_path),
        list(CALIBRATION_OPS),
        augmented_model_path=str(augmented),
        calibrate_method=chosen,
        providers=["CPUExecutionProvider"],
        extra_options=extra,
    )
    try:
        calibrator.collect_data(CalibrationReader(calib, batch))
        data = calibrator.compute_data()
    finally:
        augmented.unlink(missing_ok=True)
        Path(str(augmented) + ".data").unlink(missing_ok=True)
    out = {}
    for name, value in data.items():
        lo, hi = value.range_value if hasattr(value, "range_value") else (value.lowest, value.highest)
        out[name] = float(max(np.max(np.abs(lo)), np.max(np.abs(hi))))
    return out


# --------------------------------------------------------------------------------------------- Q/DQ insertion
def _qdq(graph_nodes: list, initializers: list, tensor: str, scale: np.ndarray, axis: Optional[int], tag: str) -> str:
    """Append Q and DQ nodes on ``tensor`` (scale per tensor, or per channel along ``axis``); return DQ's output."""
    scale = np.maximum(np.asarray(scale, dtype=np.float32), MIN_AMAX / INT8_MAX)
    zero = np.zeros(scale.shape, dtype=np.int8)
    scale_name, zero_name = f"{tag}_scale", f"{tag}_zero_point"
    initializers += [numpy_helper.from_array(scale, scale_name), numpy_helper.from_array(zero, zero_name)]
    extra = {"axis": axis} if axis is not None else {}
    graph_nodes.append(
        helper.make_node(
            "QuantizeLinear", [tensor, scale_name, zero_name], [f"{tag}_q"], name=f"{tag}_QuantizeLinear", **extra
        )
    )
    graph_nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{tag}_q", scale_name, zero_name],
            [f"{tag}_dq"],
            name=f"{tag}_DequantizeLinear",
            **extra,
        )
    )
    return f"{tag}_dq"


def _weight_axis(node: onnx.NodeProto) -> Optional[int]:
    """The output-channel axis of a node's weight: 0 for Conv, and for Gemm with transB=1 ((out, in) weights)."""
    if node.op_type == "Conv":
        return 0
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if trans_b == 1 else None


def _constants(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> the initializer it is, directly or through Identity nodes (the exporter shares equal
    constants that way)."""
    out = {i.name: i.name for i in model.graph.initializer}
    for n in model.graph.node:  # graph order: an Identity's input is resolved before it
        if n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the weighted nodes the rules quantize (Conv, Gemm with a constant weight), in graph order."""
    constants = _constants(model)
    return [
        n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in constants
    ]


def insert_qdq(
    fp32: onnx.ModelProto,
    amax: dict[str, float],
    exclude: Iterable[str] = (),
    weight_amax: Optional[dict[str, np.ndarray]] = None,
) -> onnx.ModelProto:
    """The explicit-quantization model of ``fp32`` by TensorRT's rules (module docstring); nodes in ``exclude`` keep
    no Q/DQ (they run in higher precision). ``amax`` holds activation ranges by tensor name; weight ranges are the
    weights' per-channel largest magnitudes unless ``weight_amax`` gives them by node name."""
    model = copy.deepcopy(fp32)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constants = _constants(model)
    excluded = set(exclude)
    producer = {out: n for n in graph.node for out in n.output}
    quantized = {name for name in quantizable_nodes(model) if name not in excluded}
    nodes: list = []
    added: list = []
    for node in graph.node:
        if node.name in quantized:
            x = node.input[0]
            if x not in inits and x in amax:
                node.input[0] = _qdq(nodes, added, x, np.float32(amax[x] / INT8_MAX), None, f"{node.name}_in")
            axis = _weight_axis(node)
            node.input[1] = constants[node.input[1]]  # the initializer itself (TensorRT quantizes it with the Q scale)
            weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            if weight_amax is not None and node.name in weight_amax:
                w_amax = np.asarray(weight_amax[node.name], dtype=np.float64)
            elif axis is not None:
                w_amax = np.abs(weight.reshape(weight.shape[0], -1)).max(1)
            else:
                w_amax = np.abs(weight).max()
            node.input[1] = _qdq(
                nodes,
                added,
                node.input[1],
                (w_amax / INT8_MAX).astype(np.float32),
                axis if np.ndim(w_amax) else None,
                f"{node.name}_w",
            )
        else:
            k = _residual_input(node, producer, quantized, constants)
            if k is not None and node.input[k] in amax:
                other = node.input[k]
                node.input[k] = _qdq(
                    nodes, added, other, np.float32(amax[other] / INT8_MAX), None, f"{node.name}_res{k}"
                )
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    return model


def _residual_input(node, producer: dict, quantized: set, constants: dict) -> Optional[int]:
    """A residual Add's input that the rules quantize: the one that does not come from a quantized convolution, so
    TensorRT fuses the addition into that convolution (both from convolutions, as ResNet's downsample branch: the
    second, the shortcut); None for any other node."""
    if node.op_type != "Add" or len(node.input) != 2 or any(i in constants for i in node.input):
        return None
    from_conv = [_through_bn(producer, i) in quantized for i in node.input]
    if not any(from_conv):
        return None
    return 1 if all(from_conv) else from_conv.index(False)


def residual_inputs(fp32: onnx.ModelProto, amax: dict[str, float], exclude: Iterable[str] = ()) -> dict[str, float]:
    """The tensors ``insert_qdq`` quantizes at residual Adds (tensor name -> amax): what fake quantization must
    quantize too for QAD to train what the INT8 model computes."""
    constants = _constants(fp32)
    producer = {out: n for n in fp32.graph.node for out in n.output}
    quantized = set(quantizable_nodes(fp32)) - set(exclude)
    out = {}
    for node in fp32.graph.node:
        k = _residual_input(node, producer, quantized, constants)
        if k is not None and node.input[k] in amax:
            out[node.input[k]] = float(amax[node.input[k]])
    return out


def _through_bn(producer: dict, tensor: str) -> Optional[str]:
    """The name of the node that computes ``tensor``, looking through a BatchNormalization after it."""
    node = producer.get(tensor)
    if node is not None and node.op_type == "BatchNormalization":
        node = producer.get(node.input[0])
    return node.name if node is not None else None


# ---------------------------------------------------------------------------------------------- the rules
def qdq_violations(model: onnx.ModelProto) -> list[str]:
    """Where ``model`` breaks TensorRT's explicit-quantization rules: each a sentence naming the node; [] when it
    keeps them all (INT8 zero points of 0, positive finite scales, per-tensor activations, per-channel weights
    on axis 0 sized to the output channels, no quantized bias)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # exporters also write constants as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} '{n.name}'"
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{where}: no zero point (ONNX then means UINT8): TensorRT takes INT8 with zero point 0")
            continue
        zero, scale = inits[n.input[2]], inits.get(n.input[1])
        if zero.dtype != np.int8:
            problems.append(
                f"{where}: zero point of type {zero.dtype}, TensorRT takes INT8 (an INT32 bias "
                "quantization or UINT8 activations are not explicit INT8)"
            )
        elif np.any(zero != 0):
            problems.append(f"{where}: zero point {zero.ravel()[:3]}..., TensorRT takes symmetric INT8 (0)")
        if scale is None or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{where}: scale must be a positive finite constant")
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        is_weight = n.op_type == "QuantizeLinear" and n.input[0] in inits
        if n.op_type == "DequantizeLinear":
            for consumer, k in consumers.get(n.output[0], []):
                if consumer.op_type in QUANTIZED_OPS and k == 2:
                    problems.append(
                        f"{where}: dequantizes the bias of '{consumer.name}'; keep biases in floating point"
                    )
        if is_weight:
            weight = inits[n.input[0]]
            if scale.size > 1 and (axis != 0 or scale.size != weight.shape[0]):
                problems.append(
                    f"{where}: per-channel weight scales must run along axis 0 (output channels, "
                    f"{weight.shape[0]}); found axis {axis} with {scale.size} scales"
                )
        elif n.op_type == "QuantizeLinear" and scale.size > 1:
            problems.append(f"{where}: activations are quantized per tensor, found {scale.size} scales")
    return problems
