"""The benchmark harness: warm-up, timed iterations, percentiles, stage breakdown, memory, verdict.

In the manner of trtexec and Ultralytics benchmarks: warm-up iterations are discarded, the latency
distribution is reported as percentiles, throughput is computed on the trimmed mean (the slowest and
fastest 5% dropped, so a single stall does not decide the figure), and each check of the verdict is a row
with a status (PASS, FAIL or SKIP with the reason) rather than a crash.
"""

import json
import time

import numpy as np

from edgerun.decision import softmax
from edgerun.device import TegraStats, clocks, meminfo, nvpmodel_mode, process_memory_mb, reset_peak_memory
from edgerun.errors import EdgerunError
from edgerun.preprocess import preprocess
from edgerun.spec import REQUIRED, Spec

TRIM = 0.05
DEFAULT_FRAME_SIZE = (1280, 720)  # a common line camera; resizing it is part of what the device pays per frame


MAX_FRAME_SIDE = 8192


def parse_frame_size(text):
    """'1920x1080' -> (1920, 1080)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise EdgerunError("--frame-size must be WIDTHxHEIGHT, e.g. 1280x720, not %r" % (text,)) from None
    if w <= 0 or h <= 0:
        raise EdgerunError("--frame-size must be positive, not %r" % (text,))
    if w > MAX_FRAME_SIDE or h > MAX_FRAME_SIDE:
        raise EdgerunError(
            "--frame-size %r: each side at most %d pixels (an 8K camera); 4 frames of %dx%d would need "
            "%.0f GB" % (text, MAX_FRAME_SIDE, w, h, 4.0 * w * h * 3 / 2**30)
        )
    return w, h


def percentile(sorted_values, q):
    """Linear-interpolated percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def trimmed_mean(sorted_values, trim=TRIM):
    k = int(len(sorted_values) * trim)
    kept = sorted_values[k : len(sorted_values) - k] or sorted_values
    return sum(kept) / float(len(kept))


def summarize(latencies_s, batch):
    """Latency percentiles in ms and throughput in images/s from per-iteration seconds."""
    values = sorted(latencies_s)
    mean = trimmed_mean(values)
    return {
        "iterations": len(values),
        "batch": batch,
        "latency_ms": {
            "min": values[0] * 1e3,
            "p50": percentile(values, 50) * 1e3,
            "p90": percentile(values, 90) * 1e3,
            "p95": percentile(values, 95) * 1e3,
            "p99": percentile(values, 99) * 1e3,
            "max": values[-1] * 1e3,
            "trimmed_mean": mean * 1e3,
        },
        "throughput_fps": batch / mean,
    }


def softmax_top1(logits):
    probs = softmax(logits)
    return probs.argmax(1), probs.max(1)


class BenchJob(Spec):
    """What ``run_bench`` times: the runner and the bundle's manifest; ``frames`` (uint8 images fed through the
    manifest's preprocessing), by default a synthetic feed of random frames at the camera's ``frame_size`` (width,
    height), so resizing them, a large share of the work on a Nano's CPU, is timed as the line will pay it;
    ``batch`` (default: the manifest's input batch); ``warmup`` batches, then at least ``iterations`` timed ones
    and ``min_seconds``."""

    FIELDS = {
        "runner": REQUIRED,
        "manifest": REQUIRED,
        "frames": None,
        "batch": None,
        "warmup": 10,
        "iterations": 200,
        "min_seconds": 0.0,
        "input_order": "BGR",
        "frame_size": DEFAULT_FRAME_SIZE,
    }


def _feed(job, batch):
    """(frames, what they are): the given frames, or a synthetic feed at the camera's size."""
    frames = job.frames
    kind = "given" if frames is not None else "synthetic"
    if frames is None:
        rng = np.random.RandomState(0)
        w, h = job.frame_size
        # drawn as uint8 directly: randint's default int64 then a cast held 8x the frames at once (128 MB for 10.5 MB
        # of 1280x720 frames), counted by VmHWM against the model's memory budget
        frames = rng.randint(0, 256, size=(max(batch, 4), h, w, 3), dtype=np.uint8)
    return frames, {"kind": kind, "frame_size": [int(frames[0].shape[1]), int(frames[0].shape[0])]}


class _ServingPeak(object):
    """The process's peak memory during the serving loop alone: VmHWM reset after warm-up, else VmRSS sampled after
    each timed batch; set-up's peak (engine load, the first calls' allocations) is kept apart."""

    def __init__(self):
        self.setup_peak = self.method = self.sampled = None

    def start(self):
        _, self.setup_peak = process_memory_mb()
        if reset_peak_memory():
            self.method = "VmHWM of the serving loop (reset after warm-up)"
        else:
            self.method = "VmRSS sampled after each batch of the serving loop (VmHWM could not be reset)"
            self.sampled = process_memory_mb()[0]

    def sample(self):
        if self.sampled is not None:
            self.sampled = max(self.sampled, process_memory_mb()[0] or 0)


def _timed_batches(job, frames, batch, peak):
    """Warm-up, then the timed batches: per stage and per batch seconds, and the runner.infer() call's own."""
    spec = job.manifest.preprocess
    name_in, name_out = job.manifest.input_name, job.manifest.output_name
    stages = {"preprocess": [], "h2d": [], "compute": [], "d2h": [], "postprocess": []}
    infer_calls = []  # wall time around runner.infer(): the runner's own overhead included
    totals = []
    i = 0
    timed_start = None
    while True:
        timed = i >= job.warmup
        if timed:
            if timed_start is None:
                # the budget is judged on the serving loop: the peak from here on, not set-up's nor the harness's own
                peak.start()
                timed_start = time.perf_counter()
            if len(totals) >= job.iterations and time.perf_counter() - timed_start >= job.min_seconds:
                break
        picks = [frames[(i * batch + k) % len(frames)] for k in range(batch)]
        t0 = time.perf_counter()
        feed = preprocess(picks, spec, input_order=job.input_order)
        t1 = time.perf_counter()
        out = job.runner.infer({name_in: feed})[name_out]
        t2 = time.perf_counter()
        softmax_top1(np.asarray(out))
        t3 = time.perf_counter()
        if timed:
            totals.append(t3 - t0)
            stages["preprocess"].append(t1 - t0)
            stages["postprocess"].append(t3 - t2)
            infer_calls.append(t2 - t1)
            timing = job.runner.last_timing or {}
            if timing:
                for key in ("h2d", "compute", "d2h"):
                    if key in timing:
                        stages[key].append(timing[key])
            else:
                stages["compute"].append(t2 - t1)
            peak.sample()
        i += 1
    return stages, infer_calls, totals


def _memory(runner, peak, peak_before):
    """The process's peak in the serving loop plus the device memory the runner holds (on Tegra: the shared
    memory's drop less this process's RSS growth), and how each was measured."""
    rss, process_peak = process_memory_mb()
    if peak.sampled is not None:
        process_peak = peak.sampled
    mem = meminfo()
    device = runner.device_memory()
    if device is None:  # a CPU runner: no device share at all
        device_mb, method, total = None, NO_DEVICE_MEMORY, process_peak
    else:  # unknown when the device share is: a figure not measured is never counted as 0
        device_mb, method = device["mb"], device["method"]
        total = process_peak + device_mb if process_peak is not None and device_mb is not None else None
    return {
        "process_rss_mb": rss,
        "process_peak_mb": process_peak,
        "process_peak_method": peak.method,
        "setup_peak_mb": peak.setup_peak,
        "peak_before_bench_mb": peak_before,
        "system_available_mb": mem.get("MemAvailable"),
        "system_total_mb": mem.get("MemTotal"),
        "device_mb": device_mb,
        "device_method": method,
        "total_mb": total,
    }


def run_bench(job):
    """Time the whole per-batch pipeline of ``job`` (a :class:`BenchJob`): preprocess -> infer (h2d, compute,
    d2h) -> postprocess; latency percentiles, throughput, each stage's share, memory, tegrastats, clocks."""
    batch = job.batch or job.manifest.input_shape[0]
    frames, feed_info = _feed(job, batch)
    _, peak_before = process_memory_mb()
    peak = _ServingPeak()
    with TegraStats() as tegra:
        stages, infer_calls, totals = _timed_batches(job, frames, batch, peak)
    result = summarize(totals, batch)
    model_only = [sum(parts) for parts in zip(*[stages[k] for k in ("h2d", "compute", "d2h") if stages[k]])]
    result["model_only"] = summarize(model_only, batch) if model_only else None
    result["stages_ms"] = {k: (sum(v) / len(v) * 1e3 if v else None) for k, v in stages.items()}
    frame_ms = sum(totals) / len(totals) * 1e3
    result["stages_share"] = {
        k: (v / frame_ms if v is not None and frame_ms else None) for k, v in result["stages_ms"].items()
    }
    result["feed"] = feed_info
    result["infer_call"] = summarize(infer_calls, batch)
    result["memory"] = _memory(job.runner, peak, peak_before)
    result["tegrastats"] = tegra.summary() if tegra.available else None
    result["clocks"] = clocks()
    result["nvpmodel"] = nvpmodel_mode()
    return result


NO_DEVICE_MEMORY = "none: this runner holds no GPU memory"


def device_memory_text(memory):
    """'312 MB (cuda.mem_get_info drop ...)': the device part of a result's memory and how it was measured."""
    if memory.get("device_mb") is None:
        if memory.get("device_method") == NO_DEVICE_MEMORY:
            return "0 MB (%s)" % NO_DEVICE_MEMORY
        return "not measured (%s)" % memory.get("device_method")
    return "%.0f MB (%s)" % (memory["device_mb"], memory.get("device_method"))


def verdict(result, fps_target=None, budget_mb=None, device_memory_mb=None):
    """PASS/FAIL/SKIP rows: FPS on throughput, FPS on p95 latency, memory within budget and device."""
    rows = []

    def row(check, status, measured, limit, note=""):
        rows.append({"check": check, "status": status, "measured": measured, "limit": limit, "note": note})

    fps = result["throughput_fps"]
    p95 = result["latency_ms"]["p95"]
    if fps_target:
        row(
            "throughput >= target FPS",
            "PASS" if fps >= fps_target else "FAIL",
            "%.1f FPS" % fps,
            "%.1f FPS" % fps_target,
        )
        frame_ms = 1000.0 / fps_target * result["batch"]
        row(
            "p95 latency within the frame time",
            "PASS" if p95 <= frame_ms else "FAIL",
            "%.2f ms" % p95,
            "%.2f ms" % frame_ms,
            "a frame every %.1f ms at %.0f FPS" % (1000.0 / fps_target, fps_target),
        )
    else:
        row("throughput >= target FPS", "SKIP", "%.1f FPS" % fps, "-", "no --fps-target given")
    memory = result["memory"]
    total = memory.get("total_mb")
    tegra = result.get("tegrastats") or {}
    what = "process peak (VmHWM) %s + device %s" % (
        "%.0f MB" % memory["process_peak_mb"] if memory.get("process_peak_mb") is not None else "?",
        device_memory_text(memory),
    )
    if budget_mb:
        if memory.get("process_peak_mb") is None:
            row("process memory within budget", "SKIP", "-", "%d MB" % budget_mb, "/proc/self/status unreadable")
        elif total is None:
            row(
                "process memory within budget",
                "SKIP",
                "-",
                "%d MB" % budget_mb,
                "device memory not measured, so the total is unknown: %s" % what,
            )
        else:
            row(
                "process memory within budget",
                "PASS" if total <= budget_mb else "FAIL",
                "%.0f MB" % total,
                "%d MB" % budget_mb,
                what,
            )
    else:
        row("process memory within budget", "SKIP", "%.0f MB" % total if total else "-", "-", "no --budget-mb given")
    if device_memory_mb:
        used = tegra.get("ram_used_mb_max")
        if used is None:
            total, avail = result["memory"].get("system_total_mb"), result["memory"].get("system_available_mb")
            used = (total - avail) if total and avail is not None else None
        if used is None:
            row("system memory within the device's total", "SKIP", "-", "%d MB" % device_memory_mb, "unknown")
        else:
            row(
                "system memory within the device's total",
                "PASS" if used <= device_memory_mb else "FAIL",
                "%.0f MB" % used,
                "%d MB" % device_memory_mb,
                "shared CPU/GPU memory in use",
            )
    overall = "FAIL" if any(r["status"] == "FAIL" for r in rows) else "PASS"
    feed = result.get("feed") or {}
    size = feed.get("frame_size")
    return {
        "overall": overall,
        "checks": rows,
        "holds_for": ("%s frames of %dx%d" % (feed.get("kind", "given"), size[0], size[1])) if size else None,
    }


def clock_warning(result):
    maxed = (result.get("clocks") or {}).get("maxed")
    if maxed is False:
        return (
            "clocks are not pinned at their maximum (run `sudo jetson_clocks`): published Jetson figures "
            "assume it, and these numbers will vary with DVFS"
        )
    return None


def format_table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report_text(result, verdict_result, title):
    lat = result["latency_ms"]
    lines = [
        title,
        "",
        "throughput %.1f FPS (batch %d, %d iterations, trimmed mean %.2f ms)"
        % (result["throughput_fps"], result["batch"], result["iterations"], lat["trimmed_mean"]),
        "latency ms  p50 %.2f  p90 %.2f  p95 %.2f  p99 %.2f  max %.2f"
        % (lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["max"]),
        "stages ms   (mean) "
        + "  ".join(
            "%s %.3f (%.0f%%)" % (k, v, 100 * (result.get("stages_share") or {}).get(k, 0) or 0)
            for k, v in sorted(result["stages_ms"].items())
            if v is not None
        ),
    ]
    if result.get("feed"):
        lines.append(
            "feed        %s frames of %dx%d, resized on this device's CPU like a camera's"
            % (result["feed"]["kind"], result["feed"]["frame_size"][0], result["feed"]["frame_size"][1])
        )
    mem = result["memory"]
    if mem.get("process_peak_mb"):
        lines.append(
            "memory      process peak %.0f MB + device %s = %s; system available %.0f of %.0f MB"
            % (
                mem["process_peak_mb"],
                device_memory_text(mem),
                "%.0f MB" % mem["total_mb"] if mem.get("total_mb") is not None else "unknown",
                mem.get("system_available_mb") or 0,
                mem.get("system_total_mb") or 0,
            )
        )
        if mem.get("process_peak_method"):
            lines.append(
                "            process peak: %s; set-up peak %s"
                % (mem["process_peak_method"], "%.0f MB" % mem["setup_peak_mb"] if mem.get("setup_peak_mb") else "?")
            )
    if result.get("tegrastats"):
        t = result["tegrastats"]
        lines.append("tegrastats  " + "  ".join("%s %s" % kv for kv in sorted(t.items())))
    warning = clock_warning(result)
    if warning:
        lines.append("WARNING     " + warning)
    lines += [
        "",
        format_table(
            [(r["check"], r["status"], r["measured"], r["limit"], r["note"]) for r in verdict_result["checks"]],
            ["check", "status", "measured", "limit", "note"],
        ),
        "",
        "VERDICT: %s%s"
        % (
            verdict_result["overall"],
            " (for %s)" % verdict_result["holds_for"] if verdict_result.get("holds_for") else "",
        ),
    ]
    return "\n".join(lines)


def to_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True, default=float)
