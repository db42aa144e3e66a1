"""The per-layer roofline: each convolution / linear / pooling kernel takes ``max(FLOPs / (a * peak),
bytes / (b * bandwidth))`` plus a fixed launch cost ``c`` (depthwise kernels their own efficiency and cost), summed
over the network; peaks and bandwidth are the board's data-sheet figures (``edgerun.profiles``). Every figure is
an ESTIMATE; memory is the engine's weights, the largest activations and the runtime's base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.plan.profile import ModelProfile

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}

# What a TensorRT process holds before any model: CUDA context, TensorRT and its kernels. An ASSUMPTION, not a
# measurement (no published per-board figure was found); `--measured` bench files replace it per board.
RUNTIME_BASE_MB = 300.0


@dataclass
class Factors:
    board: str  # the board whose points were fitted
    compute: float  # a: fraction of peak FLOPs reached by dense kernels
    memory: float  # b: fraction of peak bandwidth reached
    overhead_ms: float  # c: fixed cost per kernel
    scale: float = 1.0  # measured / estimated latency on the user's own board (--measured), geometric mean
    runtime_base_mb: float = RUNTIME_BASE_MB
    source: str = "published"
    # a_dw: fraction of the CUDA-core peak reached by depthwise (grouped) convolutions, fitted where the board has
    # published depthwise models; None: the dense factor ``compute`` stands in (the planner before depthwise points)
    depthwise: Optional[float] = None
    # c_dw: the fixed cost of a depthwise kernel (TensorRT fuses them with their pointwise neighbours differently
    # from dense convolutions); None: ``overhead_ms``
    depthwise_overhead_ms: Optional[float] = None
    # torch2trt's PyTorch module call around the engine (Python and binding overhead, per call): fitted on the
    # rows timed that way so that it never inflates the per-kernel cost; never part of an engine estimate
    python_ms: float = 0.0
    user_rows: int = 0  # the user's own measurements in this board's fit (edgedistill plan --calibrate)


def _peaks(target: dict, precision: str) -> tuple[float, float, float]:
    """(dense GFLOPS, grouped-conv GFLOPS, GB/s) of the board at a precision."""
    gpu = target.get("gpu")
    if not gpu:
        raise EdgedistillError(
            f"target '{target['name']}' is not a Jetson profile with GPU facts; the planner "
            "estimates TensorRT on Jetson boards (see edgerun/profiles.py)"
        )
    if precision == "fp32":
        return gpu["fp32_gflops"], gpu["fp32_gflops"], gpu["memory_gbps"]
    cuda16 = gpu["fp16_cuda_gflops"]
    if precision == "fp16":
        return gpu["fp16_tensor_gflops"] or cuda16, cuda16, gpu["memory_gbps"]
    if precision == "int8":
        if not target.get("fast_int8"):  # no INT8 kernels (Nano, TX2): never estimated faster than FP16
            return _peaks(target, "fp16")
        return gpu["int8_tensor_gops"], cuda16, gpu["memory_gbps"]
    raise EdgedistillError(f"precision '{precision}': choose fp32, fp16 or int8")


def effective_precision(target: dict, precision: str) -> str:
    """What the roofline prices: INT8 on a board without INT8 kernels (Nano, TX2) is priced as FP16, so it is
    never estimated faster (TensorRT runs it no faster there)."""
    return "fp16" if precision == "int8" and not target.get("fast_int8") else precision


def _arrays(profile: ModelProfile) -> dict:
    """The profile's layers as numpy columns (cached on the profile): the fit evaluates them thousands of times."""
    cached = getattr(profile, "_arrays", None)
    if cached is None:
        lay = profile.layers
        cached = {
            "flops": np.array([x.flops for x in lay]),
            "act": np.array([x.in_elems + x.out_elems for x in lay], dtype=float),
            "weights": np.array([x.weight_elems for x in lay], dtype=float),
            "grouped": np.array([x.kind in ("dwconv", "pool") for x in lay]),
            "dw": np.array([x.kind == "dwconv" for x in lay]),
            "kernels": sum(x.kind not in ("other", "dwconv") for x in lay),
            "dw_kernels": sum(x.kind == "dwconv" for x in lay),
        }
        object.__setattr__(profile, "_arrays", cached)
    return cached


def layer_times_ms(profile: ModelProfile, target: dict, precision: str, batch: int, factors: Factors) -> float:
    """Estimated model latency (ms per batch): per-kernel roofline plus launch overhead, times the user's scale."""
    dense, grouped, bandwidth = _peaks(target, precision)
    a = _arrays(profile)
    nbytes = BYTES[effective_precision(target, precision)]
    peak = np.where(a["grouped"], grouped, dense)
    efficiency = np.where(a["dw"], factors.depthwise or factors.compute, factors.compute)
    compute_ms = a["flops"] * batch / (efficiency * peak * 1e9) * 1e3
    memory_ms = (a["act"] * batch + a["weights"]) * nbytes / (factors.memory * bandwidth * 1e9) * 1e3
    dw_overhead = factors.overhead_ms if factors.depthwise_overhead_ms is None else factors.depthwise_overhead_ms
    total = (
        float(np.maximum(compute_ms, memory_ms).sum())
        + factors.overhead_ms * a["kernels"]
        + dw_overhead * a["dw_kernels"]
    )
    return total * factors.scale


def model_memory_mb(prof: ModelProfile, precision: str, batch: int) -> tuple[float, float]:
    """(engine, activations) in MB, ESTIMATES: the weights plus ~5% engine metadata; the largest layer's input and
    output at the batch, double-buffered. The process adds the runtime's base memory on top."""
    engine_mb = prof.params * BYTES[precision] * 1.05 / 2**20
    activations_mb = prof.activation_peak_elems * batch * BYTES[precision] * 2 / 2**20
    return engine_mb, activations_mb
