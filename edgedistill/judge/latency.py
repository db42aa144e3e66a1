"""Host latency of a model: PyTorch eager and ONNX Runtime (the runtime that serves the bundle), median of repeats
after warm-up, with the device synchronised where it has to be.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def measure_latency(
    model: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median/p90 seconds of one forward pass on a fixed random batch (device-synchronised)."""
    model.eval().to(device)
    x = torch.randn(*shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
        "batch": shape[0],
        "repeats": repeats,
    }


def measure_ort_latency(
    model: nn.Module,
    image_size: int,
    batches: tuple[int, ...],
    repeats: int,
    warmup: int,
    threads: Optional[int],
    workdir,
) -> dict[int, dict[str, float]]:
    """Median/p90 seconds per batch through ONNX Runtime's CPU provider, the runtime that serves the bundle
    on a host: the model exported once with a dynamic batch, the same fixed random input per batch size."""
    from pathlib import Path

    from edgedistill.ship.onnx import INPUT_NAME, export_onnx
    from edgerun.runtime.runners import OrtRunner

    path = Path(workdir) / "latency.onnx"
    export_onnx(model, path, (1, 3, image_size, image_size), opset=17, dynamic_batch=True)
    out = {}
    try:
        with OrtRunner(path, providers=["CPUExecutionProvider"], threads=threads) as runner:
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
                for _ in range(warmup):
                    runner.infer({INPUT_NAME: x})
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    runner.infer({INPUT_NAME: x})
                    times.append(time.perf_counter() - start)
                times.sort()
                out[batch] = {
                    "median_s": statistics.median(times),
                    "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
                    "repeats": repeats,
                }
    finally:
        path.unlink(missing_ok=True)
    return out
