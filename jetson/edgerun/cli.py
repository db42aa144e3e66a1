"""``edgerun``: the device's command line.

    edgerun info                                              device, JetPack/L4T, TensorRT, CUDA, memory, clocks
    edgerun build BUNDLE --precision fp16|int8|fp32           -> <name>.<precision>.engine + .engine.json
    edgerun validate BUNDLE [--engine E]                      accuracy on the bundle's val.npz vs the host
    edgerun bench BUNDLE [--engine E] --fps-target 30 --budget-mb 500
    edgerun camera BUNDLE [--engine E] --source csi://0 --fps-target 30 --duration 60
    edgerun verify BUNDLE [--trust KEY.pub|DIR]               every file's sha256, the signature, the pins
    edgerun pin BUNDLE [--rule allow|not_before]              approve this release in the pins file

Without --engine, the ONNX Runtime runner runs the bundle's ONNX model (``--variant int8`` for the host
INT8 model). Exit status: 0 done/PASS, 1 FAIL (bench/camera with --strict, validate over its threshold),
2 error.

Trust: with --trust KEY.pub or a folder of .pub files (else $EDGERUN_TRUST, else /etc/edgerun/trusted-keys
when that folder exists) every command refuses a bundle that is unsigned, signed by another key, or changed
in any byte since it was signed (`edgedistill pack BUNDLE -o X.edb --sign KEY`).
Pins: with --pins FILE (else $EDGERUN_PINS, else /etc/edgerun/pins.json when it exists) only the releases it
allows run, per model name: older bundles signed by the same key are refused (see edgerun/pins.py).
"""
import argparse
import contextlib
import json
import os
import sys

import numpy as np

from .bench import DEFAULT_FRAME_SIZE, parse_frame_size, report_text, run_bench, to_json, verdict
from .bundle import open_bundle
from .errors import EdgerunError
from .preprocess import preprocess
from .profiles import TARGETS, get_target
from .runners import infer_chunk


def _open(args, pinned=True):
    """The bundle named on the command line, held to the trust set and the pins when they are configured."""
    from .pins import resolve_pins
    from .signing import resolve_trust

    bundle = open_bundle(args.bundle, trust=resolve_trust(getattr(args, "trust", None)),
                         max_unpack_mb=getattr(args, "max_unpack_mb", None),
                         pins=resolve_pins(getattr(args, "pins", None)) if pinned else None)
    if bundle.trust:
        sys.stderr.write("bundle signed by trusted key %s (%s)\n" % (bundle.signer, bundle.trust))
    if bundle.pinned_by:
        sys.stderr.write("bundle admitted by %s\n" % bundle.pinned_by)
    return bundle


def _runner(args, bundle):
    if args.engine:
        from .device import gpu_properties
        from .trt import TrtRunner

        return TrtRunner(args.engine, bundle=bundle, gpu=gpu_properties())
    from .runners import OrtRunner

    return OrtRunner(bundle.variant_path(args.variant), threads=args.threads)


@contextlib.contextmanager
def _active(args, bundle):
    """The command's runner, active, its model checked against the manifest (ONNX Runtime: the engine's own record
    is checked by TrtRunner)."""
    with _runner(args, bundle) as runner:
        if not args.engine:
            check_model_matches(bundle, runner)
        yield runner


def check_model_matches(bundle, runner):
    """The manifest describes the model it ships: input and output names, input shape, one output per class. A
    bundle that disagrees is refused here, before it runs (not as an ONNX Runtime traceback, nor a camera that
    crashes on its first frame)."""
    m = bundle.manifest
    inputs = dict((i.name, i.shape) for i in runner.session.get_inputs())
    outputs = dict((o.name, o.shape) for o in runner.session.get_outputs())
    where = "bundle '%s'" % m.data.get("name")
    if m.input_name not in inputs:
        raise EdgerunError("%s: the manifest's input '%s' is not an input of its model (%s)"
                           % (where, m.input_name, ", ".join(inputs)))
    if m.output_name not in outputs:
        raise EdgerunError("%s: the manifest's output '%s' is not an output of its model (%s)"
                           % (where, m.output_name, ", ".join(outputs)))
    shape = inputs[m.input_name]
    declared = list(m.input_shape)
    if len(shape) != len(declared) or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], declared[1:])):
        raise EdgerunError("%s: the manifest's input shape %s differs from the model's %s: re-export the bundle"
                           % (where, declared, list(shape)))
    width = outputs[m.output_name][-1]
    if isinstance(width, int) and width != len(m.classes):
        raise EdgerunError("%s: the model has %d outputs and the manifest names %d classes/targets: re-export the "
                           "bundle" % (where, width, len(m.classes)))


def _check_outputs(args):
    """Every file a command will write (--json, --csv) goes into an existing folder: checked before the work."""
    for flag in ("json", "csv"):
        path = getattr(args, flag, None)
        if path and not isinstance(path, bool):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise EdgerunError("--%s %s: the folder '%s' does not exist; create it first (nothing was run)"
                                   % (flag, path, folder))


def write_json(path, data):
    """Write ``data`` as JSON atomically: a full disk or a kill never leaves a truncated file in place of the old."""
    from .engine_record import write_atomically

    write_atomically(path, to_json(data).encode("utf-8"))


def _device_memory(args, bundle):
    if args.device_profile:
        return get_target(args.device_profile).get("memory_mb")
    return (bundle.manifest.data.get("target_facts") or {}).get("memory_mb")


def _frame_size(args, bundle):
    """--frame-size, else the device profile's camera ('camera': 'WxH'), else 1280x720."""
    if args.frame_size:
        return parse_frame_size(args.frame_size)
    facts = get_target(args.device_profile) if args.device_profile else (bundle.manifest.data.get("target_facts") or {})
    return parse_frame_size(facts["camera"]) if facts.get("camera") else DEFAULT_FRAME_SIZE


def trust_state():
    """The trust set and pins this device applies, as `edgedistill deploy` asks before it copies a bundle: the
    trusted key ids (None where no trust is configured), or the reason they cannot be read."""
    import platform

    from . import __version__
    from .pins import resolve_pins
    from .signing import load_trust, resolve_trust

    state = {"edgerun": __version__, "python": platform.python_version(), "trust": None, "pins": None}
    try:
        source = resolve_trust()
        if source:
            state["trust"] = {"source": source, "key_ids": sorted(load_trust(source))}
        state["pins"] = resolve_pins()
    except EdgerunError as exc:
        state["trust_error"] = str(exc)
    return state


def cmd_info(args):
    from .device import device_info

    info = device_info()
    info.update(trust_state())
    if args.json:
        print(to_json(info))
        return 0
    for key in ("board", "l4t", "tensorrt", "cuda", "memory_total_mb", "memory_available_mb", "swap_total_mb",
                "nvpmodel", "gpu", "profile", "edgerun", "python", "trust", "pins"):
        print("%-20s %s" % (key, info.get(key) if info.get(key) is not None else "-"))
    maxed = info["clocks"].get("maxed")
    print("%-20s %s" % ("clocks pinned", {True: "yes (jetson_clocks)", False: "no: run sudo jetson_clocks before "
                                          "benchmarking", None: "unknown"}[maxed]))
    return 0


def cmd_build(args):
    from .device import gpu_properties
    from .trt import build_engine

    bundle = _open(args)
    base = os.path.basename(os.path.normpath(args.bundle))
    stem = base[:-len(".edb")] if base.endswith(".edb") else bundle.manifest.data["name"]
    output = args.output or "%s.%s.engine" % (stem, args.precision)  # student.edb -> student.fp16.engine
    meta = build_engine(bundle, precision=args.precision, output=output, workspace_mb=args.workspace_mb,
                        timing_cache=args.timing_cache, force=args.force, gpu=gpu_properties(), dla_core=args.dla,
                        gpu_fallback=args.gpu_fallback)
    print(to_json(meta))
    if meta.get("dla") and meta["dla"]["gpu_layers"]:
        print("on the GPU (the DLA cannot run them): %s" % ", ".join(meta["dla"]["gpu_layers"]))
    print("built %s in %.1f s; next: edgerun validate %s --engine %s" % (meta["engine"], meta["build_seconds"],
                                                                         args.bundle, meta["engine"]))
    return 0


def bundle_outputs(runner, bundle, batch=None):
    """(model outputs, labels) of ``runner`` on the bundle's validation images, preprocessed as the manifest says."""
    images, labels = bundle.validation()
    m = bundle.manifest
    batch = batch or m.input_shape[0]
    fixed = None if m.model.get("dynamic_batch") else m.input_shape[0]
    outputs = []
    for i in range(0, len(images), batch):
        feed = preprocess(images[i:i + batch], m.preprocess, input_order="RGB")
        outputs.append(np.asarray(infer_chunk(runner, feed, m.input_name, m.output_name, fixed)))
    return np.concatenate(outputs), labels


def evaluate_bundle(runner, bundle, batch=None):
    """Top-1 of ``runner`` on the bundle's labelled validation images."""
    logits, labels = bundle_outputs(runner, bundle, batch)
    return float((logits.argmax(1) == labels).mean())


def _validate_regression(args, bundle, runner):
    """MAE and R^2 against the bundle's targets (target units), next to the host's; PASS while R^2 drops at most
    --max-drop."""
    from .regression import restore, summarize

    m = bundle.manifest
    outputs, targets = bundle_outputs(runner, bundle)
    got = summarize(restore(m.targets, outputs), np.asarray(targets, dtype=np.float64), m.classes)
    host = m.data["metrics"].get("int8", {})
    host_r2, host_mae = host.get("fp32_r2"), host.get("fp32_mae")
    what = args.engine or "onnxruntime:%s" % (args.variant or "fp32")
    print("MAE %.4g  RMSE %.4g  R2 %.4f on %d bundle images (%s)" % (
        got["mae"], got["rmse"], got["r2"], len(targets), what))
    for name, t in sorted(got["per_target"].items()):
        print("  %s: MAE %.4g  R2 %.4f" % (name, t["mae"], t["r2"]))
    if host_r2 is not None:
        print("host  FP32 MAE %.4g  R2 %.4f" % (host_mae, host_r2))
    drop = (host_r2 - got["r2"]) if host_r2 is not None else 0.0
    result = {"task": "regression", "mae": got["mae"], "rmse": got["rmse"], "r2": got["r2"],
              "per_target": got["per_target"], "host_fp32_r2": host_r2, "host_fp32_mae": host_mae, "drop": drop,
              "max_drop": args.max_drop, "status": "PASS" if drop <= args.max_drop else "FAIL"}
    if args.json:
        write_json(args.json, result)
    print("VERDICT: %s (R2 drop %.4f vs host FP32, limit %.4f)" % (result["status"], drop, args.max_drop))
    return 0 if result["status"] == "PASS" else 1


def _decision_check(bundle, logits, labels, max_drop):
    """With an operating point in the manifest: recall and false-reject rate of the positive class at its threshold
    on the bundle's images, against the host's FP32 figures on the same images; None without one."""
    from .decision import positive_scores, rates_at

    m = bundle.manifest
    decision = m.decision
    if decision.get("threshold") is None:
        return None
    index = m.classes.index(decision["positive_class"])
    got = rates_at(np.asarray(labels) == index, positive_scores(logits, index), decision["threshold"])
    host = m.data["metrics"].get("int8", {})
    host_recall, host_fr = host.get("fp32_recall"), host.get("fp32_false_reject")
    recall_drop = (host_recall - got["recall"]) if None not in (host_recall, got["recall"]) else 0.0
    fr_rise = (got["false_reject"] - host_fr) if None not in (host_fr, got["false_reject"]) else 0.0
    ok = recall_drop <= max_drop and fr_rise <= max_drop
    pct = lambda v: "-" if v is None else "%.1f%%" % (100 * v)  # noqa: E731
    print("%s at threshold %.4f: recall %s (%d of %d rejected), false-reject %s (%d of %d good rejected)" % (
        decision["positive_class"], decision["threshold"], pct(got["recall"]), got["detected"], got["positives"],
        pct(got["false_reject"]), got["false_rejects"], got["negatives"]))
    if host_recall is not None:
        print("host  FP32 recall %s, false-reject %s on the same images" % (pct(host_recall), pct(host_fr)))
    return dict(got, positive_class=decision["positive_class"], host_fp32_recall=host_recall,
                host_fp32_false_reject=host_fr, recall_drop=recall_drop, false_reject_rise=fr_rise,
                status="PASS" if ok else "FAIL")


def cmd_validate(args):
    _check_outputs(args)
    bundle = _open(args)
    if bundle.manifest.task == "regression":
        with _active(args, bundle) as runner:
            return _validate_regression(args, bundle, runner)
    with _active(args, bundle) as runner:
        logits, labels = bundle_outputs(runner, bundle)
    top1 = float((logits.argmax(1) == labels).mean())
    metrics = bundle.manifest.data["metrics"]
    host_fp32 = metrics.get("int8", {}).get("fp32_top1")
    host_int8 = (metrics.get("int8", {}).get("int8") or {}).get("top1")
    what = args.engine or "onnxruntime:%s" % (args.variant or "fp32")
    print("top-1 %.2f%% on %d bundle images (%s)" % (top1 * 100, bundle.manifest.data["samples"]["val"]["count"], what))
    if host_fp32 is not None:
        print("host  FP32 %.2f%%%s" % (host_fp32 * 100, "   INT8 %.2f%%" % (host_int8 * 100) if host_int8 is not None else ""))
    drop = (host_fp32 - top1) if host_fp32 is not None else 0.0
    decision = _decision_check(bundle, logits, labels, args.max_drop)
    ok = drop <= args.max_drop and (decision is None or decision["status"] == "PASS")
    result = {"top1": top1, "host_fp32_top1": host_fp32, "host_int8_top1": host_int8, "drop": drop,
              "max_drop": args.max_drop, "decision": decision, "status": "PASS" if ok else "FAIL"}
    if args.json:
        write_json(args.json, result)
    line = "VERDICT: %s (drop %.2f points vs host FP32" % (result["status"], drop * 100)
    if decision is not None:
        line += ", recall drop %.2f, false-reject rise %.2f points" % (decision["recall_drop"] * 100,
                                                                      decision["false_reject_rise"] * 100)
    print(line + ", limit %.2f)" % (args.max_drop * 100))
    return 0 if result["status"] == "PASS" else 1


def cmd_bench(args):
    _check_outputs(args)
    frame_size = _frame_size(args, None) if args.frame_size else None
    bundle = _open(args)
    m = bundle.manifest
    if args.batch is not None and not m.model.get("dynamic_batch") and args.batch != m.input_shape[0]:
        raise EdgerunError("--batch %d: this model takes batches of %d (its input shape is %s, no dynamic batch); "
                           "re-export with export.dynamic_batch for other batches" % (args.batch, m.input_shape[0],
                                                                                       list(m.input_shape)))
    with _active(args, bundle) as runner:
        result = run_bench(runner, bundle.manifest, batch=args.batch, warmup=args.warmup, iterations=args.iterations,
                           min_seconds=args.min_seconds, frame_size=frame_size or _frame_size(args, bundle))
    result["runner"] = runner.name
    v = verdict(result, args.fps_target, args.budget_mb, _device_memory(args, bundle))
    from .device import board_label, board_model

    board = board_model()
    title = "edgerun bench: %s via %s on %s (synthetic feed)" % (
        bundle.manifest.data["name"], args.engine or runner.name,
        board_label() or "this host, not a Jetson: not a device figure")
    print(report_text(result, v, title))
    if args.json:
        source = bundle.manifest.data.get("source") or {}
        engine = getattr(runner, "meta", None)
        # what the workstation's planner needs to set this measurement beside its estimate
        write_json(args.json, {"result": result, "verdict": v, "board": board,
                               "bundle": {"name": bundle.manifest.data["name"], "model": source.get("student_model"),
                                          "input_shape": bundle.manifest.input_shape,
                                          "target": bundle.manifest.data.get("target")},
                               "engine": ({"path": args.engine, "precision": engine.get("precision"),
                                           "tensorrt": engine.get("tensorrt")} if engine else None)})
    return 1 if (args.strict and v["overall"] == "FAIL") else 0


def cmd_camera(args):
    from .camera import run_camera

    _check_outputs(args)
    bundle = _open(args)

    def announce(frame, text):
        print("REJECT frame %d: %s" % (frame, text))
        sys.stdout.flush()

    def value(frame, text):  # regression: the measured value of every frame
        print("frame %d: %s" % (frame, text))

    regression = bundle.manifest.task == "regression"
    if args.reject_class is not None and not regression:
        from .camera import reject_rule

        threshold, source = reject_rule(bundle.manifest, args.reject_class, args.threshold)
        print("reject rule: P(%s) >= %.4f (%s)" % (args.reject_class, threshold, source))
    if regression and args.save_unsure:
        raise EdgerunError("--save-unsure reads class probabilities; bundle '%s' is a regression bundle"
                           % bundle.manifest.data.get("name"))
    heartbeat = None
    if args.status_file:
        from .service import Heartbeat

        heartbeat = Heartbeat(args.status_file)
    with _active(args, bundle) as runner:
        soak, drift, unsure = _watchers(args, bundle, runner, regression)
        summary = run_camera(runner, bundle.manifest, args.source, duration=args.duration, max_frames=args.max_frames,
                             csv_path=args.csv, reject_class=args.reject_class, reject_threshold=args.threshold,
                             max_reconnects=args.reconnects, on_reject=announce, summary_path=args.json,
                             reject_above=args.reject_above, reject_below=args.reject_below,
                             reject_target=args.reject_target, on_frame=value if regression else None,
                             loop=args.loop, drift=drift, unsure=unsure, soak=soak, heartbeat=heartbeat)
    fps = summary["end_to_end_fps"]
    print("camera %s: %d frames in %.1f s, end-to-end %.1f FPS (model only %.1f FPS), %d dropped, %d reconnects, "
          "%d rejects" % (args.source, summary["frames_processed"], summary["seconds"], fps,
                          summary["model_only_fps"] or 0, summary["frames_dropped"], summary["reconnects"],
                          summary["rejects"]))
    status = "SKIP"
    if args.fps_target:
        status = "PASS" if fps >= args.fps_target else "FAIL"
    notes = [summary["error"]] if summary.get("error") else []
    if summary.get("error"):
        status = "FAIL"  # the source was lost for good: the frames so far are saved, the run is not a pass
    for line in _watch_lines(summary):
        print(line)
    soak = summary.get("soak")
    if soak:
        if soak["verdict"] == "FAIL":
            status = "FAIL"
            notes.append("soak: " + soak["why"])
        elif soak["verdict"] == "PASS" and status == "SKIP":
            status = "PASS"
    if args.json:
        write_json(args.json, dict(summary, verdict=status, fps_target=args.fps_target))
    print("VERDICT: %s (end-to-end FPS %.1f, target %s%s)" % (status, fps, args.fps_target or "-",
                                                            "".join("; " + n for n in notes)))
    return 1 if (args.strict and status == "FAIL") else 0


def _watchers(args, bundle, runner, regression):
    """(soak, drift watch, unsure-frame saver) for the camera as its flags ask; None for each one not asked."""
    from .decision import softmax
    from .drift import DriftWatch, UnsureFrames
    from .soak import Soak

    soak = drift = unsure = None
    for flag, value in (("--soak-interval", args.soak_interval), ("--max-slope-mb", args.max_slope_mb),
                        ("--drift-threshold", args.drift_threshold)):
        if not value > 0 or value == float("inf"):
            raise EdgerunError("%s %s: a positive, finite number" % (flag, value))
    if args.soak:
        soak = Soak(interval_s=args.soak_interval, device_memory=runner.device_memory, max_slope_mb=args.max_slope_mb)

    def warn(text):
        print(text)
        sys.stdout.flush()
        if soak is not None:
            soak.event("drift", text)

    references = int(bundle.manifest.data["samples"]["val"].get("count") or 0)
    if args.drift_window and not regression and references < 20:
        print("drift watch off: the bundle holds %d validation images, fewer than the 20 a reference needs"
              % references)
    elif args.drift_window and not regression:
        logits, _ = bundle_outputs(runner, bundle)  # the reference: the bundle's validation images on this runner
        drift = DriftWatch(softmax(logits), window=args.drift_window, threshold=args.drift_threshold, warn=warn,
                           reference_name="the bundle's %d validation images on this runner" % len(logits))
    if args.save_unsure:
        unsure = UnsureFrames(args.save_unsure, bundle.manifest.classes, margin=args.unsure_margin,
                              cap=args.save_unsure_max)
    return soak, drift, unsure


def _watch_lines(summary):
    lines = []
    drift = summary.get("drift")
    if drift:
        worst = drift["worst"]
        lines.append("drift (PSI against %s, windows of %d frames): %s%s" % (
            drift["reference"], drift["window"], drift["status"],
            "" if not worst else "; worst window at frame %d: confidence %.3f, class %.3f (threshold %.2f)" % (
                worst["frame"], worst["confidence_psi"], worst["class_psi"], drift["threshold"])))
    unsure = summary.get("unsure")
    if unsure:
        lines.append("unsure frames (top-two margin < %.2f): %d, %d saved in %s (cap %d)" % (
            unsure["margin"], unsure["unsure_frames"], unsure["saved"], unsure["folder"], unsure["cap"]))
    soak = summary.get("soak")
    if soak:
        rss = soak["rss_slope_mb"]
        lines.append("soak: %d samples over %d frames; RSS %s -> %s MB, slope %s MB per 10,000 frames (%s MB/hour); "
                     "max temperature %s C; %d throttled samples; %d events: %s (%s)" % (
                         soak["samples"], soak["frames"], _fmt(soak["rss_mb_first"]), _fmt(soak["rss_mb_last"]),
                         _fmt(rss["per_10k_frames"], "%.3f"), _fmt(rss["per_hour"], "%.2f"),
                         _fmt(soak["temperature_c_max"]), soak["throttled_samples"], len(soak["events"]),
                         soak["verdict"], soak["why"]))
    return lines


def _fmt(value, pattern="%.1f"):
    return "-" if value is None else pattern % value


def parse_duration(text):
    """'90', '90s', '30m', '24h' -> seconds (argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = str(text).strip().lower()
    scale = units.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError("'%s': seconds, or a number with s, m, h or d (24h)" % text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("'%s': a positive, finite duration" % text)
    return value


def cmd_service(args):
    from . import service

    if args.action == "status":
        got = service.status(args.name, args.state_root)
        if args.json:
            print(to_json(got))
            return 0
        unit, st = got["unit"] or {}, got["status"]
        print("edgerun-%s: %s" % (args.name, ("%s (%s), %s restart(s)" % (
            unit.get("ActiveState"), unit.get("SubState"), unit.get("NRestarts", "?"))) if unit else
            "systemd state unknown (no systemctl here)"))
        if not st:
            print("no status yet in %s (the camera writes it every 5 s once it runs)" % got["status_file"])
            return 0
        print("%s: %.1f FPS over %d frames, %d dropped, %d reconnects, %d rejects, drift %s (updated %s)" % (
            st.get("source"), st.get("fps", 0), st.get("frames", 0), st.get("dropped", 0), st.get("reconnects", 0),
            st.get("rejects", 0), st.get("drift") or "off", st.get("updated")))
        for v in st.get("last_verdicts", [])[-5:]:
            print("  %s frame %d: %s" % (v["time"], v["frame"], v["text"]))
        if st.get("error"):
            print("  ended: %s" % st["error"])
        return 0
    if not args.bundle or not args.source:
        raise EdgerunError("service install needs BUNDLE and --source (the camera the line runs)")
    bundle = _open(args)  # checked now (trust, pins, schema), not at the first start in the journal
    state = "%s/%s" % (service.STATE_ROOT, service.check_name(args.name))
    camera = [os.path.abspath(args.bundle), "--source", args.source, "--save-unsure", state + "/unsure"]
    if args.engine:
        camera += ["--engine", os.path.abspath(args.engine)]
    if args.reject_class:
        camera += ["--reject-class", args.reject_class]
    if args.threshold is not None:
        camera += ["--threshold", repr(args.threshold)]
    if args.soak:
        camera += ["--soak"]
    for flag in ("trust", "pins"):
        value = getattr(args, flag, None)
        if value:
            camera += ["--" + flag, os.path.abspath(value)]
    path = service.install(args.name, camera, args.user, args.group, unit_dir=args.unit_dir,
                           enable=not args.no_enable, watchdog_s=args.watchdog)
    print("wrote %s for '%s' (%s) on %s as user %s" % (path, bundle.manifest.data.get("name"),
                                                       bundle.manifest_sha256[:16], args.source, args.user))
    print("enabled and started: journalctl -u edgerun-%s -f; edgerun service status --name %s" % (args.name, args.name)
          if not args.no_enable else "not enabled (--no-enable): sudo systemctl enable --now edgerun-%s" % args.name)
    return 0


def cmd_verify(args):
    from .signing import SIGNATURE_FILE, read_signature

    bundle = _open(args)
    record = read_signature(bundle.folder)
    print("%s: %d files match the manifest's sha256" % (args.bundle, len(bundle.manifest.data["files"])))
    if bundle.trust:
        print("signature: valid, by trusted key %s (%s)" % (bundle.signer, bundle.trust))
    elif record:
        print("signature: %s present (key %s) but not checked: no trust set; pass --trust KEY.pub"
              % (SIGNATURE_FILE, record.get("key_id", "?")))
    else:
        print("signature: none (unsigned bundle; no trust set configured)")
    print("manifest sha256: %s (model '%s', created %s)" % (bundle.manifest_sha256, bundle.manifest.data["name"],
                                                            bundle.manifest.data.get("created", "?")))
    print("pins: %s" % (bundle.pinned_by or "none configured"))
    return 0


def cmd_slot(args):
    from . import slots

    if args.action == "list":
        result = slots.listing(args.root)
    elif args.action == "activate":
        if not args.version:
            raise slots.SlotError("slot activate needs the release: edgerun slot activate NAME VERSION --root DIR")
        result = slots.activate(args.root, args.name, args.version)
    else:
        result = slots.rollback(args.root, args.name)
    print(to_json(result))
    return 0


def cmd_pin(args):
    from .pins import DEFAULT_PINS_FILE, add_pin, resolve_pins

    path = resolve_pins(args.pins) or DEFAULT_PINS_FILE
    bundle = _open(args, pinned=False)  # verified (and held to the trust set) before it is approved
    data = add_pin(path, bundle.manifest, bundle.manifest_sha256, args.rule)
    print("%s: model '%s' now pinned with %s" % (path, bundle.manifest.data["name"],
                                                json.dumps(data["pins"][bundle.manifest.data["name"]])))
    return 0


def _count(least):
    """An argparse type: an integer of at least ``least`` (argparse's own error, exit 2, otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % (text,))
        if value < least:
            raise argparse.ArgumentTypeError("must be at least %d, not %d" % (least, value))
        return value
    return parse


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(prog="edgerun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="edgerun %s" % __version__)
    sub = parser.add_subparsers(dest="command")

    def trust_arg(p):
        p.add_argument("--trust", help="accept only bundles signed by this public key (KEY.pub) or by a key in this "
                                       "folder (default: $EDGERUN_TRUST, else /etc/edgerun/trusted-keys if present)")
        p.add_argument("--max-unpack-mb", type=float, help="refuse an .edb that unpacks to more than this (default: "
                                                           "$EDGERUN_MAX_UNPACK_MB, else 1024)")
        p.add_argument("--pins", help="run only the releases this pins file allows, per model name (default: "
                                      "$EDGERUN_PINS, else /etc/edgerun/pins.json if present; see `edgerun pin`)")
    p = sub.add_parser("info", help="device, JetPack/L4T, TensorRT, CUDA, memory, clocks")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("build", help="build a TensorRT engine from a bundle")
    p.add_argument("bundle")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("-o", "--output", help="engine file (default <name>.<precision>.engine)")
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--timing-cache", default="edgerun.timing.cache", help="persistent timing cache file")
    p.add_argument("--force", action="store_true", help="build INT8 even where it is slower or rejected")
    p.add_argument("--dla", type=int, metavar="N", help="build for Deep Learning Accelerator core N (Xavier, Orin NX, "
                                                         "AGX Orin); FP16 or INT8")
    p.add_argument("--gpu-fallback", action="store_true", help="with --dla: run the layers the DLA cannot on the GPU "
                                                              "(listed after the build)")
    trust_arg(p)

    def runner_args(p):
        p.add_argument("bundle", help="bundle folder or .edb file")
        p.add_argument("--engine", help="TensorRT engine from `edgerun build` (default: ONNX Runtime)")
        p.add_argument("--variant", default=None, help="ONNX Runtime only: fp32 (default) or int8")
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
        trust_arg(p)

    p = sub.add_parser("validate", help="accuracy on the bundle's validation images vs the host")
    runner_args(p)
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="allowed top-1 drop vs host FP32 (0.01 = 1 point), and with an operating point in the bundle "
                        "the allowed recall drop and false-reject rise at its threshold; regression: allowed R2 drop")
    p.add_argument("--json")
    p = sub.add_parser("bench", help="throughput, latency, memory; PASS/FAIL verdict")
    runner_args(p)
    p.add_argument("--fps-target", type=float)
    p.add_argument("--budget-mb", type=float, help="memory budget of this process")
    p.add_argument("--device-profile", choices=sorted(TARGETS), help="default: the bundle's target")
    p.add_argument("--batch", type=int)
    p.add_argument("--warmup", type=_count(0), default=20)
    p.add_argument("--iterations", type=_count(1), default=200)
    p.add_argument("--min-seconds", type=float, default=0.0)
    p.add_argument("--frame-size", help="synthetic camera frames, WIDTHxHEIGHT (default: the device profile's "
                                        "camera, else 1280x720): their resize is timed as part of each frame")
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--strict", action="store_true", help="exit 1 on FAIL")
    p = sub.add_parser("camera", help="classify a live source: csi://N, usb://N, /dev/videoN, rtsp://..., file")
    runner_args(p)
    p.add_argument("--source", required=True)
    p.add_argument("--duration", type=parse_duration, default=None,
                   help="seconds, or 30m, 24h (default: until the source ends)")
    p.add_argument("--loop", action="store_true", help="a video file: play it again from the start at its end")
    p.add_argument("--soak", action="store_true", help="sample RSS, device memory, temperature and clocks; report "
                                                       "memory's slope over time and frames and every reconnect")
    p.add_argument("--soak-interval", type=float, default=60.0, help="seconds between soak samples (default 60)")
    p.add_argument("--max-slope-mb", type=float, default=1.0,
                   help="soak FAILs when memory grows faster than this many MB per 10,000 frames (default 1)")
    p.add_argument("--drift-window", type=int, default=500,
                   help="classification: PSI of confidence and predicted classes over windows of this many frames "
                        "against the bundle's validation images (default 500; 0 turns the drift watch off)")
    p.add_argument("--drift-threshold", type=float, default=0.25, help="warn above this PSI (default 0.25)")
    p.add_argument("--save-unsure", metavar="DIR", help="save frames whose top-two probability margin is under "
                                                        "--unsure-margin here, with index.csv of their scores")
    p.add_argument("--unsure-margin", type=float, default=0.2)
    p.add_argument("--save-unsure-max", type=int, default=200, help="at most this many frames saved (default 200)")
    p.add_argument("--status-file", help="write FPS, drops, reconnects and the last verdicts here every 5 s (and "
                                         "speak systemd's notify protocol when run by it): `edgerun service` sets it")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--csv", help="per-frame predictions")
    p.add_argument("--reject-class", help="reject a frame when the probability of this class reaches the threshold")
    p.add_argument("--threshold", "--reject-threshold", dest="threshold", type=float, default=None,
                   help="the reject threshold (default: the bundle's operating-point threshold when --reject-class is "
                        "its positive class, else 0.5)")
    p.add_argument("--reject-above", type=float, help="regression bundles: reject a frame whose value (of --reject-target)"
                                                      " is above this, in target units")
    p.add_argument("--reject-below", type=float, help="regression bundles: reject a frame whose value is below this")
    p.add_argument("--reject-target", help="regression bundles: the target the thresholds apply to (default: the first)")
    p.add_argument("--reconnects", type=int, default=3)
    p.add_argument("--fps-target", type=float)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--strict", action="store_true")
    p = sub.add_parser("service", help="the line as a systemd service: install the unit, show its status")
    p.add_argument("action", choices=["install", "status"])
    p.add_argument("bundle", nargs="?", help="install: bundle folder or .edb the service runs")
    p.add_argument("--name", default="line", help="the unit is edgerun-NAME, its state /var/lib/edgerun/NAME")
    p.add_argument("--source", help="install: the camera (csi://0, usb://0, /dev/videoN, rtsp://...)")
    p.add_argument("--engine", help="install: the TensorRT engine (default: ONNX Runtime)")
    p.add_argument("--reject-class")
    p.add_argument("--threshold", type=float)
    p.add_argument("--soak", action="store_true", help="install: also sample memory and temperature (--soak)")
    p.add_argument("--user", default="edgerun", help="install: the unprivileged account it runs as")
    p.add_argument("--group", default="video", help="install: the camera devices' group")
    p.add_argument("--watchdog", type=int, default=30, help="install: seconds without a frame before systemd "
                                                            "restarts it")
    p.add_argument("--unit-dir", default="/etc/systemd/system")
    p.add_argument("--no-enable", action="store_true", help="install: write the unit only (no systemctl)")
    p.add_argument("--state-root", default="/var/lib/edgerun", help="status: where the services' state lives")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    trust_arg(p)
    p = sub.add_parser("verify", help="check a bundle's files, signature and pins without running it")
    p.add_argument("bundle", help="bundle folder or .edb file")
    trust_arg(p)
    p = sub.add_parser("slot", help="deployed releases under a root folder: list, activate one, roll back")
    p.add_argument("action", choices=["list", "activate", "rollback"])
    p.add_argument("name", nargs="?", help="model name (the manifest's name)")
    p.add_argument("version", nargs="?", help="activate: the release (16 hex digits of its manifest sha256)")
    p.add_argument("--root", default="edgedistill", help="the deploy root (default: ~/edgedistill over ssh)")
    p = sub.add_parser("pin", help="approve a bundle in the pins file: its exact manifest, or its date as the floor")
    p.add_argument("bundle", help="bundle folder or .edb file")
    p.add_argument("--rule", choices=["allow", "not_before"], default="allow",
                   help="allow: add this manifest's sha256 to its model's allow list (default); not_before: refuse "
                        "releases of this model created before this one (needs a trust set)")
    trust_arg(p)
    return parser


COMMANDS = {"service": cmd_service, "info": cmd_info, "build": cmd_build, "validate": cmd_validate, "bench": cmd_bench, "camera": cmd_camera,
            "verify": cmd_verify, "pin": cmd_pin, "slot": cmd_slot}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except EdgerunError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
