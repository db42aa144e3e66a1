"""Harness overhead and camera-pipeline efficiency, measured side by side in one process.

    python benchmarks/runner_overhead.py BUNDLE [BUNDLE ...] [--iterations 300] [--rounds 3]

1. ``OrtRunner`` inside the ``edgerun`` bench harness vs a bare ``InferenceSession.run`` loop on the same
   model and the same preprocessed input, batch 1, interleaved rounds. Overhead = harness time around
   ``runner.infer()`` / bare ``session.run()`` time - 1. Target: <= 5% for the student. ``OrtRunner.infer``
   in a tight loop (no harness work between calls) is measured too, to tell the runner's own cost from the
   effect of the pipeline's other work between inferences.
2. The camera loop on a video file (frames at the model's input size, so preprocessing is light) vs the
   model-only rate measured inside that same loop. Target: end-to-end FPS within 10% of model-only FPS.

A 224 px MobileNetV3-Large student (random weights: speed only) is always exported into a temporary bundle
and measured first; bundles given as arguments (trained students) follow. Writes benchmarks/results/runner_overhead.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_table  # noqa: E402

from edgerun.bench import BenchJob, run_bench, trimmed_mean  # noqa: E402
from edgerun.bundle.bundle import open_bundle  # noqa: E402
from edgerun.line.camera import (
    CameraJob,
    run_camera,  # noqa: E402
)
from edgerun.preprocess import preprocess, to_three_channels  # noqa: E402
from edgerun.runtime.runners import OrtRunner  # noqa: E402


def bare_loop(model_path: str, feed: dict, iterations: int, threads: int | None) -> float:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return trimmed_mean(sorted(times))


def runner_loop(model_path: str, feed: dict, iterations: int, threads: int | None) -> float:
    with OrtRunner(model_path, providers=["CPUExecutionProvider"], threads=threads) as runner:
        for _ in range(20):
            runner.infer(feed)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - start)
    return trimmed_mean(sorted(times))


def harness_loop(model_path: str, manifest, frames, iterations: int, threads: int | None) -> float:
    with OrtRunner(model_path, providers=["CPUExecutionProvider"], threads=threads) as runner:
        result = run_bench(
            BenchJob(
                runner=runner,
                manifest=manifest,
                frames=frames,
                batch=1,
                warmup=20,
                iterations=iterations,
                input_order="RGB",
            )
        )
    return result["infer_call"]["latency_ms"]["trimmed_mean"] / 1e3


def demo_bundle(folder: Path) -> Path:
    """A 224 px MobileNetV3-Large student bundle with random weights (for timing only)."""
    from edgedistill.data.sources import load_data
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.outputs import ExportConfig
    from edgedistill.recipe.sections import DataConfig, ModelConfig
    from edgedistill.ship.export import ExportJob, build_bundle

    cfg = DataConfig(source="digits", image_size=224, crop_pct=0.875, train_per_class=4, val_per_class=4)
    data = load_data(cfg)
    (folder / "ckpt").write_bytes(b"random weights")
    build_bundle(
        ExportJob(
            model=create_model(ModelConfig(model="mobilenetv3_large_100"), 10).eval(),
            out_dir=folder / "bundle",
            name="mnv3-large-224-random",
            classes=data.classes,
            train=data.train,
            val=data.val,
            data_cfg=cfg,
            cfg=ExportConfig(int8=False, calib_samples=8, val_samples=16, parity_samples=8),
            seed=0,
            checkpoint=folder / "ckpt",
            source={},
            host_metrics={},
            recipe_yaml="name: timing\n",
        )
    )
    return folder / "bundle"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--video-frames", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    bundles = [str(demo_bundle(tmp))] + list(args.bundles)
    rows = []
    for path in bundles:
        bundle = open_bundle(path)
        m = bundle.manifest
        images, _ = bundle.validation()
        feed = {m.input_name: preprocess(images[:1], m.preprocess)}
        bare, tight, harness = [], [], []
        for _ in range(args.rounds):  # interleaved, so drift hits every side alike
            bare.append(bare_loop(bundle.model_path, feed, args.iterations, args.threads))
            tight.append(runner_loop(bundle.model_path, feed, args.iterations, args.threads))
            harness.append(harness_loop(bundle.model_path, m, images[:1], args.iterations, args.threads))
        bare_s, tight_s, harness_s = statistics.median(bare), statistics.median(tight), statistics.median(harness)
        overhead = harness_s / bare_s - 1
        runner_overhead = tight_s / bare_s - 1

        h, w = m.preprocess.crop
        video = tmp / f"{m.data['name']}.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
        for i in range(args.video_frames):
            rgb = to_three_channels(cv2.resize(images[i % len(images)], (w, h)))
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        writer.release()
        with OrtRunner(bundle.model_path, threads=args.threads) as runner:
            cam = run_camera(CameraJob(runner=runner, manifest=m, source=str(video)))
        ratio = cam["end_to_end_fps"] / cam["model_only_fps"]
        rows.append(
            [
                m.data["name"],
                "x".join(map(str, m.input_shape)),
                f"{bare_s * 1e3:.3f}",
                f"{tight_s * 1e3:.3f} ({runner_overhead * 100:+.1f}%)",
                f"{harness_s * 1e3:.3f}",
                f"{overhead * 100:+.1f}%",
                "MET" if overhead <= 0.05 else "NOT MET",
                f"{cam['model_only_fps']:.1f}",
                f"{cam['end_to_end_fps']:.1f}",
                f"{ratio * 100:.1f}%",
                f"{cam['frames_processed']}/{cam['frames_captured']}",
                "MET" if ratio >= 0.9 else "NOT MET",
            ]
        )
    write_table(
        "runner_overhead",
        "edgerun harness overhead and camera pipeline (benchmarks/runner_overhead.py)",
        [
            "model",
            "input",
            "bare session.run ms",
            "OrtRunner.infer tight loop ms",
            "OrtRunner in harness ms",
            "harness overhead",
            "≤ 5%",
            "camera model-only FPS",
            "camera end-to-end FPS",
            "e2e / model-only",
            "frames processed/captured",
            "≥ 90%",
        ],
        rows,
        [
            f"ONNX Runtime {ort.__version__} CPU; batch 1; trimmed means (5% cut each end), median of "
            f"{args.rounds} interleaved rounds of {args.iterations} iterations",
            "camera: MJPG video file at the model's input size, read without dropping in a capture thread; "
            "end-to-end includes decode wait, preprocessing and postprocessing",
            "host CPU figures only: no TensorRT or Jetson figure is reported here",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
