"""Host (ONNX Runtime CPU) speed of teacher, student FP32 and student INT8, side by side in one process.

    python benchmarks/host_speed.py [--teacher resnet152] [--student mobilenetv3_large_100] [--size 224]
                                    [--bundle runs/<name>/bundle] [--iterations 20]

Speed rows export the named architectures at ``--size`` (random weights: latency does not depend on
them), quantize the student to INT8 (QDQ, per-channel, calibrated on real digits images) and time each at
batch 1 and 8 on the same inputs: median and p95 latency, throughput, max abs error against PyTorch (INT8:
against the FP32 model). Accuracy rows need a trained bundle (``--bundle``): FP32 vs INT8 top-1 on its
labelled validation images. Targets at 224 px, ResNet-152 -> MobileNetV3: >= 20x speedup; INT8 drop
<= 1 point. Writes benchmarks/results/host_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_table  # noqa: E402

from edgedistill.data.images import eval_spec  # noqa: E402
from edgedistill.data.sources import load_data  # noqa: E402
from edgedistill.models.factory import count_params, create_model  # noqa: E402
from edgedistill.recipe.sections import DataConfig, ModelConfig  # noqa: E402
from edgedistill.ship.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx  # noqa: E402
from edgedistill.ship.qdq import activation_ranges, insert_qdq  # noqa: E402
from edgerun.bench import percentile  # noqa: E402
from edgerun.bundle.bundle import open_bundle  # noqa: E402
from edgerun.cli.common import evaluate_bundle  # noqa: E402
from edgerun.preprocess import preprocess  # noqa: E402
from edgerun.runtime.runners import OrtRunner  # noqa: E402


def time_model(path: Path, x: np.ndarray, iterations: int, threads: int | None) -> dict:
    with OrtRunner(path, providers=["CPUExecutionProvider"], threads=threads) as runner:
        for _ in range(3):
            runner.infer({INPUT_NAME: x})
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            out = runner.infer({INPUT_NAME: x})[OUTPUT_NAME]
            times.append(time.perf_counter() - start)
    times.sort()
    return {
        "median": statistics.median(times),
        "p95": percentile(times, 95),
        "fps": len(x) / statistics.median(times),
        "out": out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet152")
    parser.add_argument("--student", default="mobilenetv3_large_100")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bundle", action="append", default=[], help="trained bundle(s) for the accuracy rows")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="host-speed-"))

    torch.manual_seed(0)
    cfg = DataConfig(source="digits", image_size=args.size, crop_pct=0.875, train_per_class=4, val_per_class=2)
    data = load_data(cfg)
    spec = eval_spec(cfg)
    real = preprocess([data.val.load(i) for i in range(8)], spec)  # the same 8 real images for every model
    calib = preprocess([data.train.load(i) for i in range(32)], spec)
    models = {}
    for role, name in (("teacher", args.teacher), ("student", args.student)):
        model = create_model(ModelConfig(model=name), args.classes).eval()
        path = tmp / f"{role}.onnx"
        export_onnx(model, path, (1, 3, args.size, args.size), 17, dynamic_batch=True)
        with torch.no_grad():
            ref = model(torch.from_numpy(real)).numpy()
        models[role] = (name, path, count_params(model), ref)
    int8_path = tmp / "student.int8.onnx"
    # the bundle's INT8 model: Q/DQ by TensorRT's rules, activation ranges calibrated on the 32 images (minmax)
    amax = activation_ranges(models["student"][1], calib, 8, "minmax", tmp)
    onnx.save(insert_qdq(onnx.load(str(models["student"][1])), amax), str(int8_path))

    rows, lat = [], {}
    entries = [
        ("teacher", "fp32", models["teacher"][1]),
        ("student", "fp32", models["student"][1]),
        ("student", "int8", int8_path),
    ]
    for role, precision, path in entries:
        name, _, params, ref = models[role]
        cells = [name, role, precision, f"{params / 1e6:.2f}M"]
        for batch in (1, 8):
            t = time_model(
                path, real[:batch], args.iterations if batch == 1 else max(5, args.iterations // 2), args.threads
            )
            lat[(role, precision, batch)] = t
            cells += [f"{t['median'] * 1e3:.2f} / {t['p95'] * 1e3:.2f}", f"{t['fps']:.1f}"]
        out = lat[(role, precision, 8)]["out"]
        base = ref if precision == "fp32" else lat[("student", "fp32", 8)]["out"]
        err = float(np.abs(out - base).max())
        agree = float((out.argmax(1) == base.argmax(1)).mean())
        cells += [
            f"{err:.1e} ({'vs PyTorch' if precision == 'fp32' else 'vs FP32 ONNX'}), top-1 agree {agree * 100:.0f}%"
        ]
        rows.append(cells)
    speed1 = lat[("teacher", "fp32", 1)]["median"] / lat[("student", "fp32", 1)]["median"]
    speed8 = lat[("teacher", "fp32", 8)]["median"] / lat[("student", "fp32", 8)]["median"]
    int8_1 = lat[("student", "fp32", 1)]["median"] / lat[("student", "int8", 1)]["median"]
    int8_8 = lat[("student", "fp32", 8)]["median"] / lat[("student", "int8", 8)]["median"]
    notes = [
        f"{args.size} px, {args.classes} classes, ONNX Runtime {ort.__version__} CPUExecutionProvider, opset 17, "
        f"latency = median / p95 ms over {args.iterations} (batch 1) and {max(5, args.iterations // 2)} (batch 8) "
        f"runs after 3 warm-up runs; weights random (speed does not depend on them)",
        f"speedup teacher/student FP32: {speed1:.1f}x at batch 1, {speed8:.1f}x at batch 8 "
        f"(target >= 20x: {'MET' if speed1 >= 20 else 'NOT MET'} at batch 1, "
        f"{'MET' if speed8 >= 20 else 'NOT MET'} at batch 8)",
        f"INT8/FP32 speed ratio of the student: {int8_1:.2f}x at batch 1, {int8_8:.2f}x at batch 8",
    ]
    for bpath in args.bundle:
        b = open_bundle(bpath)
        with OrtRunner(b.model_path) as r:
            fp32 = evaluate_bundle(r, b)
        variant = b.manifest.variant("int8")
        if variant:
            with OrtRunner(b.variant_path("int8")) as r:
                int8 = evaluate_bundle(r, b)
            notes.append(
                f"accuracy, bundle '{b.manifest.data['name']}' ({b.manifest.input_shape[-1]} px, "
                f"{b.manifest.data['samples']['val']['count']} val images): FP32 {fp32 * 100:.2f}%, INT8 "
                f"{int8 * 100:.2f}%, drop {(fp32 - int8) * 100:.2f} points (target <= 1: "
                f"{'MET' if fp32 - int8 <= 0.01 else 'NOT MET'}); parity "
                f"{b.manifest.data['metrics']['parity']['max_abs_error']:.1e}"
            )
    notes.append("no TensorRT or Jetson figure here: those come from `edgerun bench` on the device")
    write_table(
        "host_speed",
        "Host speed: teacher vs student FP32 vs student INT8 (benchmarks/host_speed.py)",
        [
            "model",
            "role",
            "precision",
            "params",
            "b1 latency ms (median / p95)",
            "b1 img/s",
            "b8 latency ms (median / p95)",
            "b8 img/s",
            "max abs error",
        ],
        rows,
        notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
