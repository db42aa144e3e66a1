"""The student as ONNX: export at the target's opset (TorchScript exporter), the check that the target's TensorRT
parses every operator, onnxslim, ONNX Runtime's outputs fed in the model's batch, and parity with PyTorch.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from torch import nn

from edgedistill.errors import ExportError
from edgedistill.recipe.outputs import ExportConfig
from edgerun.profiles import parse_version
from edgerun.runtime.runners import OrtRunner, infer_chunk

log = logging.getLogger(__name__)


INPUT_NAME = "input"

OUTPUT_NAME = "logits"

# ONNX operators TensorRT's ONNX parser does not take (onnx-tensorrt docs/operators.md of each release);
# entries carry the first TensorRT version that supports them, None = no release does.
TENSORRT_UNSUPPORTED: dict[str, Optional[tuple]] = {
    "ConvInteger": None,
    "MatMulInteger": None,
    "QLinearConv": None,
    "QLinearMatMul": None,
    "DynamicQuantizeLinear": None,
    "Unique": None,
    "StringNormalizer": None,
    "TfIdfVectorizer": None,
    "SequenceAt": None,
    "SequenceConstruct": None,
    "SequenceEmpty": None,
    "SequenceInsert": None,
    "SequenceErase": None,
    "SequenceLength": None,
    "ConcatFromSequence": None,
    "SplitToSequence": None,
    "Optional": None,
    "OptionalHasElement": None,
    "OptionalGetElement": None,
    "NonZero": (8, 5),
    "Col2Im": (8, 6),
    "GroupNormalization": (10, 0),
}


def check_operators(model: onnx.ModelProto, target: dict[str, Any], opset: int) -> None:
    """Raise ExportError naming the first node whose operator the target's runtime cannot take."""
    trt_version = parse_version(target["tensorrt"]) if target.get("runtime") == "tensorrt" else None
    for node in model.graph.node:
        where = f"node '{node.name or '<unnamed>'}' ({node.op_type})"
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            raise ExportError(
                f"{where} is in operator domain '{domain}', which target {target['name']} does not "
                f"take; only standard ONNX operators can be exported"
            )
        if not onnx.defs.has(node.op_type, opset, ""):
            raise ExportError(
                f"{where}: operator {node.op_type} does not exist at opset {opset} (target "
                f"{target['name']}); change the model or the target"
            )
        if trt_version is not None and node.op_type in TENSORRT_UNSUPPORTED:
            since = TENSORRT_UNSUPPORTED[node.op_type]
            if since is None or trt_version < since:
                raise ExportError(
                    f"{where}: TensorRT {target['tensorrt']} (target {target['name']}) cannot parse operator "
                    f"{node.op_type}"
                    + ("" if since is None else f" (supported from TensorRT {'.'.join(map(str, since))})")
                    + "; replace that layer in the model or pick another target"
                )


def export_onnx(model: nn.Module, path: Path, shape: tuple[int, ...], opset: int, dynamic_batch: bool) -> None:
    model = model.eval().cpu()
    dummy = torch.zeros(*shape)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter honours low opsets exactly (TensorRT 8.2 takes at most 13); the dynamo
        # exporter starts at opset 18 and its down-conversion fails on common graphs.
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            opset_version=opset,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def simplify(path: Path) -> bool:
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim is not installed: the graph is exported unsimplified (pip install onnxslim)")
        return False
    slim = onnxslim.slim(str(path))
    onnx.save(slim, str(path))
    return True


def cpu_runner(path: Path) -> OrtRunner:
    """An ONNX Runtime runner on the CPU for ``path``: use it as a context manager, pass it to what infers."""
    return OrtRunner(path, providers=["CPUExecutionProvider"])


def chunked_outputs(runner: OrtRunner, batches: np.ndarray, step: int, batch: Optional[int] = None) -> np.ndarray:
    """The first output of an active one-input ``runner`` on ``batches``, fed ``step`` at a time; with a fixed
    engine ``batch``, the last chunk is padded to it (``infer_chunk``)."""
    name, out = runner.input_names()[0], runner.output_names()[0]
    return np.concatenate(
        [infer_chunk(runner, batches[i : i + step], name, out, batch) for i in range(0, len(batches), step)]
    )


def ort_outputs(path: Path, batches: np.ndarray, batch: int, dynamic: bool) -> np.ndarray:
    """The outputs of a one-input, one-output ONNX model on ``batches`` (ONNX Runtime, CPU), fed in chunks of its
    fixed ``batch`` (the last one padded) or, with a dynamic batch, of at least 32."""
    with cpu_runner(path) as runner:
        return chunked_outputs(runner, batches, max(batch, 32) if dynamic else batch, None if dynamic else batch)


@torch.no_grad()
def _torch_logits(model: nn.Module, batches: np.ndarray) -> np.ndarray:
    model = model.eval().cpu()
    return np.concatenate(
        [model(torch.from_numpy(np.ascontiguousarray(batches[i : i + 64]))).numpy() for i in range(0, len(batches), 64)]
    )


def parity(
    model: nn.Module, path: Path, batches: np.ndarray, cfg: ExportConfig, classification: bool = True
) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on the same preprocessed held-out images (top-1 agreement: classification only)."""
    ref = _torch_logits(model, batches)
    got = ort_outputs(path, batches, cfg.batch, cfg.dynamic_batch)
    result = {
        "samples": int(len(batches)),
        "max_abs_error": float(np.abs(ref - got).max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if classification else 1.0,
    }
    if result["max_abs_error"] > cfg.parity_atol or result["top1_agreement"] < cfg.parity_min_agreement:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch on {result['samples']} held-out images: max abs "
            f"error {result['max_abs_error']:.2e} (tolerance export.parity_atol = {cfg.parity_atol}), "
            f"top-1 agreement {result['top1_agreement']:.4f} (minimum export.parity_min_agreement = "
            f"{cfg.parity_min_agreement}); nothing was written"
        )
    return result
