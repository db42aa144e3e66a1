"""``edgerun camera``: a live source classified (or measured) frame by frame, with the reject decision, the drift watch,
unsure frames, the soak and the service heartbeat."""

import argparse
import sys

from edgerun.cli.common import (
    PROBABILITY,
    active_runner,
    add_runner_args,
    bundle_outputs,
    check_outputs,
    number,
    open_from_args,
    write_json,
)
from edgerun.errors import EdgerunError


def cmd_camera(args):
    from edgerun.line.camera import CameraJob, run_camera

    check_outputs(args)
    bundle = open_from_args(args)

    def announce(frame, text):
        print("REJECT frame %d: %s" % (frame, text))
        sys.stdout.flush()

    def value(frame, text):  # regression: the measured value of every frame
        print("frame %d: %s" % (frame, text))

    regression = bundle.manifest.task == "regression"
    anomaly = bundle.manifest.task == "anomaly"
    if (regression or anomaly) and args.save_unsure:
        raise EdgerunError(
            "--save-unsure reads class probabilities; bundle '%s' is a %s bundle (anomaly bundles: --save-maps)"
            % (bundle.manifest.data.get("name"), bundle.manifest.task)
        )
    heartbeat = None
    if args.status_file:
        from edgerun.line.service import Heartbeat

        heartbeat = Heartbeat(args.status_file)
    if args.threshold is not None and not anomaly and not 0.0 <= args.threshold <= 1.0:
        raise EdgerunError(
            "--threshold %g: a classification bundle rejects on a probability, in [0, 1]" % args.threshold
        )
    if args.save_maps and not anomaly:
        raise EdgerunError(
            "--save-maps saves anomaly maps; bundle '%s' is not an anomaly detector" % bundle.manifest.data.get("name")
        )
    maps = None
    if args.save_maps:
        from edgerun.line.camera import MapSaver

        maps = MapSaver(args.save_maps, args.save_maps_max)
    with active_runner(args, bundle) as runner:
        if anomaly:
            threshold = args.threshold if args.threshold is not None else bundle.manifest.decision["threshold"]
            print(
                "reject rule: anomaly score >= %.4g (%s)"
                % (threshold, "--threshold" if args.threshold is not None else "the bundle's threshold")
            )
        if args.reject_class is not None and not regression:
            from edgerun.line.camera import reject_rule

            threshold, source = reject_rule(bundle.manifest, args.reject_class, args.threshold, runner.precision)
            print("reject rule: P(%s) >= %.4f (%s)" % (args.reject_class, threshold, source))
        soak, drift, unsure = _watchers(args, bundle, runner, regression or anomaly)  # no class probabilities
        summary = run_camera(
            CameraJob(
                runner=runner,
                manifest=bundle.manifest,
                source=args.source,
                duration=args.duration,
                max_frames=args.max_frames,
                csv_path=args.csv,
                reject_class=args.reject_class,
                reject_threshold=args.threshold,
                max_reconnects=args.reconnects,
                on_reject=announce,
                summary_path=args.json,
                reject_above=args.reject_above,
                reject_below=args.reject_below,
                reject_target=args.reject_target,
                on_frame=value if regression else None,
                loop=args.loop,
                drift=drift,
                unsure=unsure,
                soak=soak,
                heartbeat=heartbeat,
                save_maps=maps,
            )
        )
    status, notes = _verdict(args, summary)
    if args.json:
        write_json(args.json, dict(summary, verdict=status, fps_target=args.fps_target))
    print(
        "VERDICT: %s (end-to-end FPS %.1f, target %s%s)"
        % (status, summary["end_to_end_fps"], args.fps_target or "-", "".join("; " + n for n in notes))
    )
    return 1 if (args.strict and status == "FAIL") else 0


def _verdict(args, summary):
    """Print the run's figures and what its watchers saw; (PASS/FAIL/SKIP, why): FAIL under the FPS target, when the
    source was lost for good, or when the soak failed."""
    fps = summary["end_to_end_fps"]
    print(
        "camera %s: %d frames in %.1f s, end-to-end %.1f FPS (model only %.1f FPS), %d dropped, %d reconnects, "
        "%d rejects"
        % (
            args.source,
            summary["frames_processed"],
            summary["seconds"],
            fps,
            summary["model_only_fps"] or 0,
            summary["frames_dropped"],
            summary["reconnects"],
            summary["rejects"],
        )
    )
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
    return status, notes


def _watchers(args, bundle, runner, no_probabilities):
    """(soak, drift watch, unsure-frame saver) for the camera as its flags ask; None for each one not asked."""
    from edgerun.decision import softmax
    from edgerun.line.drift import DriftWatch, UnsureFrames
    from edgerun.line.soak import Soak

    soak = drift = unsure = None
    for flag, value in (
        ("--soak-interval", args.soak_interval),
        ("--max-slope-mb", args.max_slope_mb),
        ("--drift-threshold", args.drift_threshold),
    ):
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
    if args.drift_window and not no_probabilities and references < 20:
        print(
            "drift watch off: the bundle holds %d validation images, fewer than the 20 a reference needs" % references
        )
    elif args.drift_window and not no_probabilities:
        logits, _ = bundle_outputs(runner, bundle)  # the reference: the bundle's validation images on this runner
        drift = DriftWatch(
            softmax(logits),
            window=args.drift_window,
            threshold=args.drift_threshold,
            warn=warn,
            reference_name="the bundle's %d validation images on this runner" % len(logits),
        )
    if args.save_unsure:
        unsure = UnsureFrames(
            args.save_unsure, bundle.manifest.classes, margin=args.unsure_margin, cap=args.save_unsure_max
        )
    return soak, drift, unsure


def _watch_lines(summary):
    lines = []
    drift = summary.get("drift")
    if drift:
        worst = drift["worst"]
        lines.append(
            "drift (PSI against %s, windows of %d frames): %s%s"
            % (
                drift["reference"],
                drift["window"],
                drift["status"],
                ""
                if not worst
                else "; worst window at frame %d: confidence %.3f, class %.3f (threshold %.2f)"
                % (worst["frame"], worst["confidence_psi"], worst["class_psi"], drift["threshold"]),
            )
        )
    unsure = summary.get("unsure")
    if unsure:
        lines.append(
            "unsure frames (top-two margin < %.2f): %d, %d saved in %s (cap %d)"
            % (unsure["margin"], unsure["unsure_frames"], unsure["saved"], unsure["folder"], unsure["cap"])
        )
    soak = summary.get("soak")
    if soak:
        rss = soak["rss_slope_mb"]
        lines.append(
            "soak: %d samples over %d frames; RSS %s -> %s MB, slope %s MB per 10,000 frames (%s MB/hour); "
            "max temperature %s C; %d throttled samples; %d events: %s (%s)"
            % (
                soak["samples"],
                soak["frames"],
                _fmt(soak["rss_mb_first"]),
                _fmt(soak["rss_mb_last"]),
                _fmt(rss["per_10k_frames"], "%.3f"),
                _fmt(rss["per_hour"], "%.2f"),
                _fmt(soak["temperature_c_max"]),
                soak["throttled_samples"],
                len(soak["events"]),
                soak["verdict"],
                soak["why"],
            )
        )
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
        raise argparse.ArgumentTypeError("'%s': seconds, or a number with s, m, h or d (24h)" % text) from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("'%s': a positive, finite duration" % text)
    return value


def add_parser(sub):
    p = sub.add_parser("camera", help="classify a live source: csi://N, usb://N, /dev/videoN, rtsp://..., file")
    add_runner_args(p)
    p.add_argument("--source", required=True)
    p.add_argument(
        "--duration", type=parse_duration, default=None, help="seconds, or 30m, 24h (default: until the source ends)"
    )
    p.add_argument("--loop", action="store_true", help="a video file: play it again from the start at its end")
    p.add_argument(
        "--soak",
        action="store_true",
        help="sample RSS, device memory, temperature and clocks; report "
        "memory's slope over time and frames and every reconnect",
    )
    p.add_argument(
        "--soak-interval", type=number(above=0), default=60.0, help="seconds between soak samples (default 60)"
    )
    p.add_argument(
        "--max-slope-mb",
        type=number(0),
        default=1.0,
        help="soak FAILs when memory grows faster than this many MB per 10,000 frames (default 1)",
    )
    p.add_argument(
        "--drift-window",
        type=int,
        default=500,
        help="classification: PSI of confidence and predicted classes over windows of this many frames "
        "against the bundle's validation images (default 500; 0 turns the drift watch off)",
    )
    p.add_argument("--drift-threshold", type=number(0), default=0.25, help="warn above this PSI (default 0.25)")
    p.add_argument(
        "--save-unsure",
        metavar="DIR",
        help="save frames whose top-two probability margin is under "
        "--unsure-margin here, with index.csv of their scores",
    )
    p.add_argument("--unsure-margin", type=PROBABILITY, default=0.2)
    p.add_argument("--save-unsure-max", type=int, default=200, help="at most this many frames saved (default 200)")
    p.add_argument(
        "--save-maps",
        metavar="DIR",
        help="anomaly bundles: save each rejected frame with its anomaly map laid over it (DIR/<frame>.png, index.csv)",
    )
    p.add_argument("--save-maps-max", type=int, default=200, help="at most this many map overlays (default 200)")
    p.add_argument(
        "--status-file",
        help="write FPS, drops, reconnects and the last verdicts here every 5 s (and "
        "speak systemd's notify protocol when run by it): `edgerun service` sets it",
    )
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--csv", help="per-frame predictions")
    p.add_argument("--reject-class", help="reject a frame when the probability of this class reaches the threshold")
    p.add_argument(
        "--threshold",
        "--reject-threshold",
        dest="threshold",
        type=number(),
        default=None,
        help="the reject threshold: a probability in [0, 1] for a classification bundle (default: the bundle's "
        "operating-point threshold when --reject-class is its positive class, else 0.5); an anomaly score for an "
        "anomaly bundle (default: the bundle's threshold)",
    )
    p.add_argument(
        "--reject-above",
        type=number(),
        help="regression bundles: reject a frame whose value (of --reject-target) is above this, in target units",
    )
    p.add_argument("--reject-below", type=number(), help="regression bundles: reject a frame whose value is below this")
    p.add_argument(
        "--reject-target", help="regression bundles: the target the thresholds apply to (default: the first)"
    )
    p.add_argument("--reconnects", type=int, default=3)
    p.add_argument("--fps-target", type=number(above=0))
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--strict", action="store_true")
    p.set_defaults(handler=cmd_camera)
