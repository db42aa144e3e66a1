"""``edgedistill deploy``: a run (or an .edb) to one board or a fleet over OpenSSH; ``--pull-frames`` brings the
frames the cameras were unsure of home, ``--rollback`` switches the boards back to their previous release."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from edgedistill.cli.console import setup_logging
from edgedistill.errors import EdgedistillError
from edgerun.bundle.signing import PASSPHRASE_ENV


def add_parser(sub) -> None:
    p = sub.add_parser(
        "deploy",
        help="to one board or a fleet over ssh: copy, verify, build, validate, bench (and "
        "the camera), results back in RUN/devices/, the release made current on PASS",
    )
    p.add_argument(
        "target",
        help="run folder (runs/<name>, its bundle is packed), an .edb, or a registered version: models:/NAME/3 or "
        "models:/NAME@alias (MLflow; each board's verdict goes back as tags on that version)",
    )
    p.add_argument("--tracking-uri", help="the MLflow registry of a models:/ TARGET (default $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        required=True,
        metavar="USER@BOARD",
        help="a board as ssh takes it (user@host, a Host of ~/.ssh/config); repeat for a fleet",
    )
    p.add_argument(
        "--precision",
        default="fp16",
        help="fp16 (default), int8, fp32: the TensorRT engine to build; "
        "onnxruntime: no engine, edgerun's ONNX Runtime runner",
    )
    p.add_argument("--source", help="also run the line camera for --duration: csi://0, usb://0, rtsp://..., a file")
    p.add_argument("--duration", type=float, default=30.0, help="camera seconds (default 30)")
    p.add_argument("--fps-target", type=float)
    p.add_argument("--budget-mb", type=float, help="memory budget of the process on the board")
    p.add_argument("--frame-size", help="bench frames WIDTHxHEIGHT (default: the board profile's camera)")
    p.add_argument("--max-drop", type=float, help="validate: allowed top-1 drop vs the host (default 0.01)")
    p.add_argument("--jobs", type=int, default=4, help="boards deployed at once (default 4)")
    p.add_argument(
        "--remote-dir",
        default="edgedistill",
        help="the deploy root on each board, relative to the login's home (default edgedistill)",
    )
    p.add_argument(
        "--edgerun",
        help="the edgerun command on the boards (default: REMOTE_DIR/venv/bin/edgerun, else edgerun on PATH)",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="copy this checkout's edgerun to REMOTE_DIR/lib on each "
        "board (a launcher in REMOTE_DIR/bin), run by the board's "
        "Python; nothing is downloaded there",
    )
    p.add_argument(
        "--remote-python",
        default="python3",
        help="the boards' Python for --install (default python3: JetPack's, with its numpy, OpenCV and TensorRT)",
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=3600.0,
        help="seconds any one step may take on a board (the camera: its --duration more); past it the step is "
        "stopped on the board too and the board's row is an ERROR (default 3600)",
    )
    p.add_argument(
        "--max-result-mb",
        type=int,
        default=64,
        help="the most a board's results folder may send back (default 64 MB), capped while it arrives",
    )
    p.add_argument("--ssh-config", help="an ssh_config file instead of ~/.ssh/config")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="passed to ssh -o")
    p.add_argument(
        "--activate",
        choices=["pass", "always", "never"],
        default="pass",
        help="switch the board's current release: on a PASS (default), always, never",
    )
    p.add_argument("--sign", metavar="KEY", help="sign the run's bundle with this key before copying")
    p.add_argument("--output", help="where results go (default: RUN/devices, or runs/<name>/devices for an .edb)")
    p.add_argument(
        "--pull-frames",
        action="store_true",
        help="fetch the frames each board's camera was unsure of (saved by the deploy's camera run or "
        "`edgerun camera --save-unsure`) into <run>/devices/<board>/unsure/, for data.unlabeled, and an anomaly "
        "detector's rejected frames with their map overlays (--save-maps) into <run>/devices/<board>/maps/",
    )
    p.add_argument(
        "--rollback",
        action="store_true",
        help="switch each board back to its previous release of the model named by TARGET (a run, an .edb or a name)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgedistill.deploy.fleet import deploy
    from edgedistill.deploy.release import DeployOptions

    setup_logging(None, args.verbose)
    opts = DeployOptions(
        precision=args.precision,
        source=args.source,
        duration=args.duration,
        fps_target=args.fps_target,
        budget_mb=args.budget_mb,
        frame_size=args.frame_size,
        max_drop=args.max_drop,
        jobs=args.jobs,
        remote_dir=args.remote_dir,
        edgerun=args.edgerun,
        ssh_config=args.ssh_config,
        ssh_options=args.ssh_option,
        activate=args.activate,
        install=args.install,
        remote_python=args.remote_python,
        timeout=args.step_timeout,
        max_result_mb=args.max_result_mb,
    )
    if args.rollback and args.pull_frames:
        raise EdgedistillError("--rollback and --pull-frames are two trips: run them one at a time")
    if args.pull_frames:
        return _pull_frames(args, opts)
    if args.rollback:
        return _rollback(args, opts)
    registered = None
    target = Path(args.target)
    if args.target.startswith("models:/"):
        from edgedistill.run.registry import RegisteredBundle

        cache = (Path(args.output) if args.output else Path("runs")) / "registry"
        registered = RegisteredBundle(args.target, args.tracking_uri, cache)
        target = registered.edb
    fleet = deploy(
        target,
        args.host,
        opts,
        Path(args.output) if args.output else None,
        sign_key=args.sign,
        passphrase=os.environ.get(PASSPHRASE_ENV) if args.sign else None,
    )
    print(f"release {fleet['release']['name']} {fleet['release']['version']} ({opts.precision})")
    print("\n".join(fleet["table"]))
    for note in fleet["refit"]:
        print(note)
    print(f"results: {fleet['fleet_json']}")
    if registered is not None:
        registered.record_deploy(fleet["rows"])
        print(f"each board's verdict is a tag on {args.target} (version {registered.version})")
    return 0 if all(r["status"] == "PASS" for r in fleet["rows"]) else 1


def _model_name(target: str) -> str:
    """The model a --rollback or --pull-frames trip is about: a run's or an .edb's bundle name, else TARGET."""
    from edgedistill.deploy.release import check_model_name, prepare_release

    if not Path(target).exists():
        return check_model_name(target, "TARGET (a model name)")
    with tempfile.TemporaryDirectory() as tmp:
        return prepare_release(Path(target), Path(tmp)).name


def _pull_frames(args: argparse.Namespace, opts) -> int:
    from edgedistill.deploy.fleet import pull_frames

    name = _model_name(args.target)
    run_dir = Path(args.target) if (Path(args.target) / "bundle").is_dir() else Path("runs") / name
    out = Path(args.output) if args.output else run_dir / "devices"
    rows = pull_frames(args.host, name, opts, out)
    for row in rows:
        print(
            f"{row['host']}: "
            + (
                f"{row['frames']} unsure frame(s) from {row['releases']} release(s) in {row['folder']}"
                + (
                    f"; {row['maps']} rejected frame(s) with their anomaly maps in {row['maps_folder']}"
                    if row["maps"]
                    else ""
                )
                if row["status"] == "DONE"
                else f"ERROR {row['reason']}"
            )
        )
    got = [r["folder"] for r in rows if r["status"] == "DONE" and r["frames"]]
    if got:
        print(
            "let the teacher label them for the next student: edgedistill run RECIPE --set "
            f"data.unlabeled={got[0] if len(got) == 1 else out}"
        )
    return 0 if all(r["status"] == "DONE" for r in rows) else 1


def _rollback(args: argparse.Namespace, opts) -> int:
    from edgedistill.deploy.fleet import rollback

    rows = rollback(args.host, _model_name(args.target), opts)
    for row in rows:
        print(
            f"{row['host']}: {row['status']} "
            + (f"current {row['current']}, previous {row['previous']}" if row["status"] == "DONE" else row["reason"])
        )
    return 0 if all(r["status"] == "DONE" for r in rows) else 1
