"""``edgerun bench``: throughput, latency percentiles and memory of the serving loop on camera-size frames, and the
PASS/FAIL verdict against the FPS target and the memory budget."""

from edgerun.bench import DEFAULT_FRAME_SIZE, BenchJob, parse_frame_size, report_text, run_bench, verdict
from edgerun.cli.common import active_runner, add_runner_args, check_outputs, count, number, open_from_args, write_json
from edgerun.errors import EdgerunError
from edgerun.profiles import TARGETS, get_target


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


def cmd_bench(args):
    check_outputs(args)
    frame_size = _frame_size(args, None) if args.frame_size else None
    bundle = open_from_args(args)
    m = bundle.manifest
    if args.batch is not None and not m.model.get("dynamic_batch") and args.batch != m.input_shape[0]:
        raise EdgerunError(
            "--batch %d: this model takes batches of %d (its input shape is %s, no dynamic batch); "
            "re-export with export.dynamic_batch for other batches"
            % (args.batch, m.input_shape[0], list(m.input_shape))
        )
    with active_runner(args, bundle) as runner:
        result = run_bench(
            BenchJob(
                runner=runner,
                manifest=bundle.manifest,
                batch=args.batch,
                warmup=args.warmup,
                iterations=args.iterations,
                min_seconds=args.min_seconds,
                frame_size=frame_size or _frame_size(args, bundle),
            )
        )
    result["runner"] = runner.name
    v = verdict(result, args.fps_target, args.budget_mb, _device_memory(args, bundle))
    from edgerun.device import board_label, board_model

    board = board_model()
    title = "edgerun bench: %s via %s on %s (synthetic feed)" % (
        bundle.manifest.data["name"],
        args.engine or runner.name,
        board_label() or "this host, not a Jetson: not a device figure",
    )
    print(report_text(result, v, title))
    if args.json:
        source = bundle.manifest.data.get("source") or {}
        engine = getattr(runner, "meta", None)
        # what the workstation's planner needs to set this measurement beside its estimate
        write_json(
            args.json,
            {
                "result": result,
                "verdict": v,
                "board": board,
                "bundle": {
                    "name": bundle.manifest.data["name"],
                    "model": source.get("student_model"),
                    "input_shape": bundle.manifest.input_shape,
                    "num_classes": len(bundle.manifest.classes),
                    "target": bundle.manifest.data.get("target"),
                },
                "engine": (
                    {"path": args.engine, "precision": engine.get("precision"), "tensorrt": engine.get("tensorrt")}
                    if engine
                    else None
                ),
            },
        )
    return 1 if (args.strict and v["overall"] == "FAIL") else 0


def add_parser(sub):
    p = sub.add_parser("bench", help="throughput, latency, memory; PASS/FAIL verdict")
    add_runner_args(p)
    p.add_argument("--fps-target", type=number(above=0))
    p.add_argument("--budget-mb", type=number(above=0), help="memory budget of this process")
    p.add_argument("--device-profile", choices=sorted(TARGETS), help="default: the bundle's target")
    p.add_argument("--batch", type=int)
    p.add_argument("--warmup", type=count(0), default=20)
    p.add_argument("--iterations", type=count(1), default=200)
    p.add_argument("--min-seconds", type=number(0), default=0.0)
    p.add_argument(
        "--frame-size",
        help="synthetic camera frames, WIDTHxHEIGHT (default: the device profile's "
        "camera, else 1280x720): their resize is timed as part of each frame",
    )
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--strict", action="store_true", help="exit 1 on FAIL")
    p.set_defaults(handler=cmd_bench)
