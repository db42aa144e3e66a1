"""INT8 that keeps the student's accuracy, for every TensorRT the targets run (8.2, 8.5, 10.x).

One explicit-quantization model: QuantizeLinear/DequantizeLinear (Q/DQ) pairs placed by TensorRT's rules
("Explicit Quantization" in NVIDIA's TensorRT developer guide), which TensorRT builds without a calibrator:

- symmetric INT8: every Q/DQ has an INT8 zero point of 0, scale = amax / 127;
- the inputs of the weighted layers (Conv, Gemm) are quantized per tensor, their weights per output channel (axis 0);
- biases stay in floating point (TensorRT folds them itself; its parser rejects an INT32 bias Q/DQ);
- the residual input of an Add that follows a quantized convolution is quantized too, so that TensorRT can fuse
  the addition into that convolution;
- a layer left without Q/DQ runs in higher precision (FP16 when the engine allows it): that is how the partial
  model keeps its most sensitive layers out of INT8.

Three ways to that model, tried in this order by ``export.int8: auto``:

1. PTQ: activation ranges calibrated once on the bundle's calibration images (ONNX Runtime's MinMax, Entropy or
   Percentile calibrators), weights' ranges from the weights.
2. Partial: each quantized layer's sensitivity is measured on the calibration images (top-1 agreement with the
   FP32 model when that layer alone is left in floating point: label-free, so the validation images that judge the
   result never choose it); in that order, each layer that lowers the disagreement with FP32 is kept out of INT8
   until the disagreement is under ``export.int8_max_drop`` (a bound on the top-1 drop on those images) or
   ``export.int8_keep_budget`` layers are kept.
3. Quantization-aware distillation (QAD): the trained student with fake quantization on exactly those layers
   (the same activation scales, per-channel weight scales), fine-tuned a few epochs at a low learning rate with
   the distillation loss against its FP32 teacher (``export.qad_teacher``: the run's teacher or the FP32 student);
   then exported and quantized by the same rules. Folding BatchNorm into a convolution scales each output channel,
   which per-channel weight scales absorb exactly, so the exported model computes what was trained.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

log = logging.getLogger(__name__)

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
        chunk = np.ascontiguousarray(self.batches[self.i:self.i + self.batch])
        self.i += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.i = 0


def activation_ranges(fp32_path: Path, calib: np.ndarray, batch: int, method: str,
                      workdir: Path) -> dict[str, float]:
    """amax (the largest magnitude kept) of every input and output of the Conv, Gemm and Add nodes, from ONNX Runtime's
    calibrator (``minmax``, ``entropy`` or ``percentile``) run on the calibration batches."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    chosen = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[method]
    # histograms as TensorRT's own calibrators use them: 2048 bins, entropy searches thresholds quantized to 128 bins
    # (ONNX Runtime's defaults of 128 and 128 leave its KL search one candidate, the maximum), symmetric ranges
    extra = {"symmetric": True, **({"num_bins": 2048, "num_quantized_bins": 128} if method == "entropy" else {}),
             **({"num_bins": 2048, "percentile": 99.999} if method == "percentile" else {})}
    augmented = Path(workdir) / "calibration.augmented.onnx"
    calibrator = create_calibrator(str(fp32_path), list(CALIBRATION_OPS), augmented_model_path=str(augmented),
                                   calibrate_method=chosen, providers=["CPUExecutionProvider"], extra_options=extra)
    try:
        calibrator.collect_data(CalibrationReader(calib, batch))
        data = calibrator.compute_data()
    finally:
        augmented.unlink(missing_ok=True)
        Path(str(augmented) + ".data").unlink(missing_ok=True)
    out = {}
    for name, value in data.items():
        lo, hi = (value.range_value if hasattr(value, "range_value") else (value.lowest, value.highest))
        out[name] = float(max(np.max(np.abs(lo)), np.max(np.abs(hi))))
    return out


# --------------------------------------------------------------------------------------------- Q/DQ insertion
def _qdq(graph_nodes: list, initializers: list, tensor: str, scale: np.ndarray, axis: Optional[int],
         tag: str) -> str:
    """Append Q and DQ nodes on ``tensor`` (scale per tensor, or per channel along ``axis``); return DQ's output."""
    scale = np.maximum(np.asarray(scale, dtype=np.float32), MIN_AMAX / INT8_MAX)
    zero = np.zeros(scale.shape, dtype=np.int8)
    scale_name, zero_name = f"{tag}_scale", f"{tag}_zero_point"
    initializers += [numpy_helper.from_array(scale, scale_name), numpy_helper.from_array(zero, zero_name)]
    extra = {"axis": axis} if axis is not None else {}
    graph_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [f"{tag}_q"],
                                        name=f"{tag}_QuantizeLinear", **extra))
    graph_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", scale_name, zero_name], [f"{tag}_dq"],
                                        name=f"{tag}_DequantizeLinear", **extra))
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
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1
            and n.input[1] in constants]


def insert_qdq(fp32: onnx.ModelProto, amax: dict[str, float], exclude: Iterable[str] = (),
               weight_amax: Optional[dict[str, np.ndarray]] = None) -> onnx.ModelProto:
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
            node.input[1] = _qdq(nodes, added, node.input[1], (w_amax / INT8_MAX).astype(np.float32),
                                 axis if np.ndim(w_amax) else None, f"{node.name}_w")
        elif node.op_type == "Add" and len(node.input) == 2 and not any(i in constants for i in node.input):
            # a residual add: quantize the input that does not come from a quantized convolution, so TensorRT
            # fuses the addition into that convolution
            # (both from convolutions, as ResNet's downsample branch: the second input, the shortcut)
            from_conv = [_through_bn(producer, i) in quantized for i in node.input]
            if any(from_conv):
                k = 1 if all(from_conv) else from_conv.index(False)
                other = node.input[k]
                if other in amax:
                    node.input[k] = _qdq(nodes, added, other, np.float32(amax[other] / INT8_MAX), None,
                                         f"{node.name}_res{k}")
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    return model


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
            problems.append(f"{where}: zero point of type {zero.dtype}, TensorRT takes INT8 (an INT32 bias "
                            "quantization or UINT8 activations are not explicit INT8)")
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
                    problems.append(f"{where}: dequantizes the bias of '{consumer.name}'; keep biases in floating "
                                    "point")
        if is_weight:
            weight = inits[n.input[0]]
            if scale.size > 1 and (axis != 0 or scale.size != weight.shape[0]):
                problems.append(f"{where}: per-channel weight scales must run along axis 0 (output channels, "
                                f"{weight.shape[0]}); found axis {axis} with {scale.size} scales")
        elif n.op_type == "QuantizeLinear" and scale.size > 1:
            problems.append(f"{where}: activations are quantized per tensor, found {scale.size} scales")
    return problems


# ------------------------------------------------------------------------------------------ the three attempts
@dataclass
class Attempt:
    """One INT8 model tried on the host: how it was made, its quality, whether it passes the gate."""

    kind: str  # ptq | partial | qad
    path: Path
    score: float
    quality: dict[str, Any]
    drop: float
    kept: list[str] = field(default_factory=list)  # layers left out of INT8 (they run in FP16 on the device)
    extra: dict[str, Any] = field(default_factory=dict)

    def passes(self, limit: float) -> bool:
        return self.drop <= limit


def agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    """Share of images on which two models' top-1 agree."""
    return float((reference.argmax(1) == logits.argmax(1)).mean())


def output_r2(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Regression: how much of the FP32 outputs' variance the INT8 outputs reproduce (R² against FP32, mean over
    targets); 1 is identical."""
    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(outputs, dtype=np.float64)
    sst = np.maximum(((ref - ref.mean(0)) ** 2).sum(0), 1e-12)
    return float(np.mean(1 - ((ref - out) ** 2).sum(0) / sst))


def sensitivity(fp32: onnx.ModelProto, amax: dict[str, float], run: Callable[[onnx.ModelProto], np.ndarray],
                reference: np.ndarray, nodes: list[str],
                fidelity: Callable[[np.ndarray, np.ndarray], float] = agreement) -> list[dict[str, Any]]:
    """Each quantized layer's share of the INT8 error, label-free on the calibration images: ``fidelity`` to the FP32
    model (top-1 agreement; regression: R² against FP32's outputs) when everything is quantized, and when that layer
    alone is left in floating point. Rows sorted by what the layer recovers, most first."""
    full = fidelity(reference, run(insert_qdq(fp32, amax)))
    rows = []
    for name in nodes:
        alone_out = fidelity(reference, run(insert_qdq(fp32, amax, exclude=[name])))
        rows.append({"layer": name, "agreement_all_int8": full, "agreement_without_it": alone_out,
                     "recovered": alone_out - full})
    rows.sort(key=lambda r: r["recovered"], reverse=True)
    return rows


def keep_sensitive(rows: list[dict[str, Any]], budget: int, score: Callable[[list[str]], float], baseline: float,
                   limit: float) -> tuple[list[str], float, list[dict[str, Any]]]:
    """Greedy partial quantization: in sensitivity order, leave each layer out of INT8 when that lowers the drop
    (``baseline - score(kept)``, re-measured with every layer kept so far: layers interact, a float layer's output can
    make the next one fragile), until the drop is at most ``limit`` or ``budget`` layers are kept. Returns (kept, drop,
    every step tried)."""
    kept: list[str] = []
    steps = []
    drop = float("inf")
    for row in rows:
        if len(kept) >= budget or drop <= limit:
            break
        trial = baseline - score(kept + [row["layer"]])
        helps = trial < drop
        steps.append({"layer": row["layer"], "drop": trial, "kept": helps})
        if helps:
            kept.append(row["layer"])
            drop = trial
    return kept, drop, steps


# ------------------------------------------------------------------------- quantization-aware distillation
def module_for_node(node_name: str) -> str:
    """The PyTorch module path behind an exported node name: '/blocks/blocks.0/blocks.0.0/se/conv_reduce/Conv' ->
    'blocks.0.0.se.conv_reduce' (each scope segment is a child name, or its parent's segment extended by dots)."""
    current, last = "", ""
    for segment in node_name.strip("/").split("/")[:-1]:
        if last and segment.startswith(last + "."):
            current = current[: len(current) - len(last)] + segment
        else:
            current = f"{current}.{segment}" if current else segment
        last = segment
    return current


def _fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().abs().reshape(weight.shape[0], -1).amax(1)
    scale = (flat.clamp_min(MIN_AMAX) / INT8_MAX).float()
    return torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                  -128, 127)


class FakeQuantized(nn.Module):
    """A Conv2d or Linear whose input is fake-quantized per tensor with a fixed amax (the PTQ calibration's) and whose
    weight is fake-quantized per output channel by its own largest magnitudes, as the exported model will be;
    gradients pass straight through (the straight-through estimator of PyTorch's fake_quantize ops)."""

    def __init__(self, inner: nn.Module, input_amax: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("input_amax", torch.tensor(float(input_amax)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.input_amax.clamp_min(MIN_AMAX) / INT8_MAX).float()
        x = torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros((), dtype=torch.int32), -128, 127)
        weight = _fake_quant_per_channel(self.inner.weight)
        if isinstance(self.inner, nn.Linear):
            return nn.functional.linear(x, weight, self.inner.bias)
        return self.inner._conv_forward(x, weight, self.inner.bias)


def add_fake_quant(model: nn.Module, input_amax: dict[str, float]) -> nn.Module:
    """A copy of ``model`` with the modules named in ``input_amax`` wrapped in :class:`FakeQuantized`."""
    model = copy.deepcopy(model)
    names = dict(model.named_modules())
    for name, amax in input_amax.items():
        parent_name, _, attr = name.rpartition(".")
        parent = names[parent_name] if parent_name else model
        setattr(parent, attr, FakeQuantized(getattr(parent, attr), amax))
    return model


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """The float model inside a fake-quantized one (its trained weights), for export."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantized):
            parent_name, _, attr = name.rpartition(".")
            parent = dict(model.named_modules())[parent_name] if parent_name else model
            setattr(parent, attr, module.inner)
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm statistics stay as trained (QAD fine-tunes weights; the exported model folds these statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# ------------------------------------------------------------------------------------------------ orchestration
@dataclass
class Int8Job:
    """What one export's INT8 work needs: the FP32 ONNX, its calibration batches, how to score a model on the
    held-out images (the gate) and how to run it on the calibration images (sensitivity), the settings."""

    fp32_path: Path
    workdir: Path
    calib: np.ndarray
    calib_batch: int
    score: Callable[[Path], dict[str, Any]]  # quality() of an ONNX file on the held-out images: {..., "score"}
    run_calib: Callable[[Path], np.ndarray]  # an ONNX file's outputs on the calibration images
    fp32_score: float
    mode: str  # ptq | partial | qad | auto
    method: str  # minmax | entropy | percentile
    limit: float  # export.int8_max_drop
    budget: int  # export.int8_keep_budget
    sensitivity_images: int
    regression: bool = False  # fidelity to FP32 is then R² of the outputs, not top-1 agreement
    qad: Optional[Callable[[dict[str, float]], tuple[nn.Module, dict[str, Any]]]] = None  # input amax -> model, facts
    export_float: Optional[Callable[[nn.Module, Path], Path]] = None  # a float model -> simplified FP32 ONNX


def _save(model: onnx.ModelProto, path: Path) -> Path:
    problems = qdq_violations(model)
    if problems:  # our own inserter: a violation is a bug here, never the user's
        raise AssertionError("the INT8 model breaks TensorRT's explicit-quantization rules: " + "; ".join(problems[:3]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_int8(job: Int8Job) -> dict[str, Any]:
    """Try PTQ, then (auto, partial) the partial model, then (auto, qad) quantization-aware distillation, until one
    passes the gate; write the chosen model to ``workdir/model.int8.onnx``. Returns what the manifest records:
    every attempt's quality and drop, the sensitivity table, the kept layers, the chosen attempt, its status and,
    when INT8 is rejected, the advice with the next recipe line."""
    fp32 = onnx.load(str(job.fp32_path))
    amax = activation_ranges(job.fp32_path, job.calib, job.calib_batch, job.method, job.workdir)
    nodes = quantizable_nodes(fp32)
    attempts: list[Attempt] = []

    def attempt(kind: str, model: onnx.ModelProto, kept: list[str], **extra: Any) -> Attempt:
        path = _save(model, job.workdir / f".int8-{kind}.onnx")
        quality = job.score(path)
        got = Attempt(kind, path, quality["score"], quality, job.fp32_score - quality["score"], kept, extra)
        attempts.append(got)
        log.info("INT8 %s: score %.4f vs FP32 %.4f (drop %.4f, gate %.4f)%s", kind, got.score, job.fp32_score, got.drop,
                 job.limit, f", {len(kept)} layer(s) kept in FP16" if kept else "")
        return got

    result: dict[str, Any] = {"layers": len(nodes), "calibration": job.method}
    ptq = attempt("ptq", insert_qdq(fp32, amax), [])
    kept: list[str] = []
    if not ptq.passes(job.limit) and job.mode in ("auto", "partial"):
        reference = job.run_calib(job.fp32_path)[: job.sensitivity_images]

        def on_calib(model: onnx.ModelProto) -> np.ndarray:
            return job.run_calib(_save(model, job.workdir / ".int8-probe.onnx"))[: job.sensitivity_images]

        fidelity = output_r2 if job.regression else agreement
        rows = sensitivity(fp32, amax, on_calib, reference, nodes, fidelity)
        # decided on the calibration images (fidelity to FP32, no labels); the validation images judge the result
        kept, _, steps = keep_sensitive(rows, job.budget, lambda k: fidelity(reference, on_calib(
            insert_qdq(fp32, amax, exclude=k))), 1.0, job.limit)
        (job.workdir / ".int8-probe.onnx").unlink(missing_ok=True)
        for row in rows:
            row["kept"] = row["layer"] in kept
        result["sensitivity"] = rows
        result["partial_steps"] = steps
        attempt("partial", insert_qdq(fp32, amax, exclude=kept), kept)
    best = next((a for a in attempts if a.passes(job.limit)), None)
    wants_qad = job.mode == "qad" or (job.mode == "auto" and best is None)
    if wants_qad and job.qad is not None and job.export_float is not None:
        by_module = {module_for_node(n.name): amax[n.input[0]] for n in fp32.graph.node
                     if n.name in nodes and n.input[0] in amax}
        trained, facts = job.qad(by_module)
        qad_fp32 = job.export_float(trained, job.workdir / ".qad-fp32.onnx")
        qad_float = onnx.load(str(qad_fp32))
        qad_try = attempt("qad", insert_qdq(qad_float, amax), [], **facts)
        if not qad_try.passes(job.limit) and kept:
            attempt("qad+partial", insert_qdq(qad_float, amax, exclude=kept), kept, **facts)
        Path(qad_fp32).unlink(missing_ok=True)
    passing = [a for a in attempts if a.passes(job.limit)]
    if job.mode == "qad":
        passing = [a for a in passing if a.kind.startswith("qad")] or passing
    chosen = passing[0] if passing else min(attempts, key=lambda a: a.drop)
    final = job.workdir / "model.int8.onnx"
    chosen.path.replace(final)
    for a in attempts:
        a.path.unlink(missing_ok=True)
    result.update({
        "attempts": {a.kind: {**{k: v for k, v in a.quality.items() if k != "score"}, "drop": a.drop,
                              "kept_fp16": a.kept, "passes": a.passes(job.limit), **a.extra} for a in attempts},
        "chosen": chosen.kind, "kept_fp16": chosen.kept, "drop": chosen.drop,
        "status": "accepted" if chosen.passes(job.limit) else "rejected",
        "quality": {k: v for k, v in chosen.quality.items() if k != "score"},
    })
    result["advice"] = gate_advice(result, job)
    return result


def gate_advice(result: dict[str, Any], job: Int8Job) -> str:
    """What was tried, with what drop, and the recipe line for the next remedy ('' when INT8 passed)."""
    tried = []
    names = {"ptq": f"PTQ ({job.method})", "partial": "partial", "qad": "QAD", "qad+partial": "QAD + partial"}
    for kind, a in result["attempts"].items():
        what = names[kind] + (f", {len(a['kept_fp16'])} layer(s) kept in FP16" if a["kept_fp16"] else "")
        if kind.startswith("qad") and a.get("epochs"):
            what += f", {a['epochs']} epoch(s)"
        tried.append(f"{what}: drop {a['drop'] * 100:.2f} points")
    text = "; ".join(tried)
    if result["status"] == "accepted":
        return f"INT8 {result['chosen']} passes the {job.limit * 100:.2f}-point gate ({text})"
    kinds = set(result["attempts"])
    if "qad" in kinds:
        epochs = result["attempts"]["qad"].get("epochs") or 1
        nxt = (f"--set export.qad_epochs={2 * epochs} (longer quantization-aware distillation), or "
               f"--set export.int8_keep_budget={2 * job.budget} (more layers in FP16)")
    elif "partial" in kinds:
        nxt = "--set export.int8=qad (quantization-aware distillation, against the FP32 teacher)"
    else:
        nxt = "--set export.int8=auto (sensitivity-guided partial INT8, then quantization-aware distillation)"
    return f"INT8 rejected: {text}, over the {job.limit * 100:.2f}-point gate; next: {nxt}"
