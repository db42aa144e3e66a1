"""A 16-trial TPE study with pruning against the same 16 trials of the temperature x alpha grid, and tracking's cost.

    python benchmarks/tune.py /path/to/cifar10-jpeg.tar.gz [--seeds 0,1,2] [--train 300] [--val 100] [--test 300]
        [--epochs 6] [--teacher-epochs 15] [--part all|search|overhead|table]

The CIFAR-10 recipe (``recipes/cifar10.yaml``: ResNet-18 teacher, MobileNetV2-0.5 student, 32 px) at a CPU budget:
``--train`` images per class for training, ``--val`` more from train/ as the validation split the studies choose on
(CIFAR-10 ships no validation split; the recipe's own run validates on test/, which a search must never see), and
``--test`` images per class of test/ that chose nothing. Per seed one run folder: the teacher once, then

- **grid**: ``edgedistill tune --sampler grid --pruner none``, temperature {1, 2, 4, 8} x alpha {0.2, 0.4, 0.6, 0.8};
- **TPE**: ``edgedistill tune --trials 16`` (TPE, median pruner) over temperature [1, 8] (log) x alpha [0.2, 0.8];

each reported as: the best validation top-1 found, the test top-1 of that trial's student (images that chose
nothing), and the total training seconds of its trials (pruning's saving). **overhead**: the distill stage of
seed 0 run twice with tracking off and twice on (a local ``mlflow server``, SQLite, loopback), alternated; the
command's wall time per epoch, on against off (target <= 2%).

Resumable: each finished row goes to benchmarks/results/tune.jsonl at once; the table is benchmarks/results/tune.md.
Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, append_row, load_rows, mean_std, write_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROWS = RESULTS / "tune.jsonl"
GRID = {"distill.temperature": {"choices": [1.0, 2.0, 4.0, 8.0]}, "distill.alpha": {"choices": [0.2, 0.4, 0.6, 0.8]}}
TPE = {"distill.temperature": {"low": 1.0, "high": 8.0, "log": True}, "distill.alpha": {"low": 0.2, "high": 0.8}}


def _split(archive: Path, work: Path, args) -> Path:
    """train/ val/ test/ class folders (symlinks) cut from the archive's train/ and test/, the same every time."""
    raw = work / "raw"
    if not (raw / "cifar10").is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(raw, filter="data")
    root = work / f"split-{args.train}-{args.val}-{args.test}"
    if (root / ".done").exists():
        return root
    for cls_dir in sorted((raw / "cifar10" / "train").iterdir()):
        files = sorted(cls_dir.iterdir())
        for split, chosen in (("train", files[: args.train]), ("val", files[args.train : args.train + args.val])):
            (root / split / cls_dir.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (root / split / cls_dir.name / f.name).symlink_to(f.resolve())
    for cls_dir in sorted((raw / "cifar10" / "test").iterdir()):
        (root / "test" / cls_dir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls_dir.iterdir())[: args.test]:
            (root / "test" / cls_dir.name / f.name).symlink_to(f.resolve())
    (root / ".done").write_text("")
    return root


def _recipe(root: Path, work: Path, seed: int, args, name: str, tracking: str | None = None) -> Path:
    data = yaml.safe_load((REPO / "recipes" / "cifar10.yaml").read_text())
    data.update(name=name, seed=seed, output=str(work / name))
    data["data"].update(root=str(root), val_dir="val", test_dir="test", train_per_class=None)
    data["teacher"]["epochs"] = args.teacher_epochs
    data["teacher"]["min_top1"] = 0.3  # a teacher at this CPU budget: weaker than the recipe's, said in the table
    data["student"]["epochs"] = args.epochs
    data["student"]["val_every"] = 1
    if tracking:
        data["tracking"] = {"mlflow": {"uri": tracking, "experiment": "tune-benchmark"}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _edgedistill(*argv: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgedistill", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _test_top1(recipe_path: Path, study: str, trial) -> float:
    """The trial's student on the test split (which no study saw)."""
    from edgedistill.data.loaders import eval_loader
    from edgedistill.judge.evaluate import classification_report
    from edgedistill.models.predict import predict
    from edgedistill.recipe.loading import load_recipe
    from edgedistill.run.context import RunContext
    from edgedistill.run.folder import STUDENT_SECTIONS, Step
    from edgedistill.run.tune_space import trial_recipe

    ctx = RunContext(load_recipe(recipe_path))
    recipe = trial_recipe(ctx.recipe, trial.params)
    cell = ctx.derive(recipe)
    key = f"tune/{study}/{trial.user_attrs['folder']}"
    cell.steps[key] = Step(key, key, "student", recipe.student, ctx.steps["distill"].teacher, STUDENT_SECTIONS)
    model = cell.trained_model(key, "benchmark")
    assert ctx.eval_split.name == "test", ctx.eval_split.name
    pred = predict(model.to(ctx.device), eval_loader(ctx.eval_split, ctx.recipe.data), ctx.device)
    return float(classification_report(pred, ctx.data.classes, ctx.evaluation)["top1"])


def _search(root: Path, work: Path, seed: int, method: str, args) -> dict:
    import optuna
    from optuna.trial import TrialState

    name = f"tune-bench-s{seed}"
    recipe = _recipe(root, work, seed, args, name)
    space = work / f"space-{method}.yaml"
    space.write_text(yaml.safe_dump(GRID if method == "grid" else TPE))
    extra = (
        ["--sampler", "grid", "--pruner", "none"] if method == "grid" else ["--sampler", "tpe", "--pruner", "median"]
    )
    wall = _edgedistill("tune", str(recipe), "--space", str(space), "--trials", "16", "--study", method, *extra)
    storage = f"sqlite:///{(work / name / 'tune.db').resolve()}"
    trials = optuna.load_study(study_name=method, storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    return {
        "key": f"{seed}-{method}",
        "seed": seed,
        "method": method,
        "teacher_val_top1": json.loads((work / name / "teacher" / "report.json").read_text())["top1"],
        "best_val_top1": best.value,
        "best_params": best.params,
        "test_top1": _test_top1(recipe, method, best),
        "train_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in trials),
        "wall_seconds": wall,
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
    }


def _mlflow_server(work: Path) -> tuple[subprocess.Popen, str]:
    port = 5000 + os.getpid() % 1000
    folder = work / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'm.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start")


def _overhead(root: Path, work: Path, args, done: dict) -> None:
    """The distill stage with tracking off and on, alternated, the seed-0 teacher copied into each run folder."""
    teacher = work / "tune-bench-s0" / "teacher"
    if not (teacher / "done.json").exists():
        _edgedistill("teacher", str(_recipe(root, work, 0, args, "tune-bench-s0")))
    server, uri = _mlflow_server(work)
    try:
        for repeat in (1, 2):
            for mode in ("off", "on"):
                key = f"overhead-{mode}-{repeat}"
                if key in done:
                    continue
                name = f"overhead-{mode}-{repeat}"
                shutil.rmtree(work / name, ignore_errors=True)
                recipe = _recipe(root, work, 0, args, name, tracking=uri if mode == "on" else None)
                shutil.copytree(teacher, work / name / "teacher")
                wall = _edgedistill("distill", str(recipe))
                epochs = [
                    json.loads(line)
                    for line in (work / name / "student" / "metrics.jsonl").read_text().splitlines()
                    if '"kind": "epoch"' in line
                ]
                row = {
                    "key": key,
                    "mode": mode,
                    "wall_seconds": wall,
                    "epochs": len(epochs),
                    "epoch_seconds": statistics.mean(e["seconds"] for e in epochs),
                }
                append_row(ROWS, row)
                done[key] = row
    finally:
        server.terminate()
        server.wait(timeout=30)


def _table(args) -> None:
    rows = {r["key"]: r for r in load_rows(ROWS)}
    search = [r for r in rows.values() if r.get("method")]
    out = []
    by = {m: [r for r in search if r["method"] == m] for m in ("grid", "tpe")}
    for method, title in (("grid", "grid (16 cells, no pruning)"), ("tpe", "TPE, median pruner (16 trials)")):
        got = by[method]
        if not got:
            continue
        out.append(
            [
                title,
                ", ".join(str(r["seed"]) for r in got),
                mean_std([100 * r["best_val_top1"] for r in got]),
                mean_std([100 * r["test_top1"] for r in got]),
                mean_std([r["train_seconds"] for r in got], ".0f"),
                mean_std([r["pruned"] for r in got], ".1f"),
            ]
        )
    notes = [
        f"CIFAR-10 at a CPU budget: {args.train} training and {args.val} validation images per class from train/, "
        f"{args.test} test images per class; teacher {args.teacher_epochs} epochs, each student {args.epochs} epochs "
        "(validated every epoch); the studies choose on validation, the test column is the chosen trial's student "
        "on images that chose nothing.",
    ]
    teachers = [r["teacher_val_top1"] for r in search if "teacher_val_top1" in r]
    if teachers:
        notes.append(
            f"the teacher's validation top-1: {mean_std([100 * t for t in teachers])}% (min_top1 lowered to 30%)"
        )
    paired = [(r, rows.get(f"{r['seed']}-grid")) for r in by["tpe"] if rows.get(f"{r['seed']}-grid")]
    if paired:
        saving = [100 * (1 - t["train_seconds"] / g["train_seconds"]) for t, g in paired]
        gain = [100 * (t["best_val_top1"] - g["best_val_top1"]) for t, g in paired]
        notes.append(
            f"TPE against the grid, paired by seed ({len(paired)}): training time saved {mean_std(saving, '.0f')}%, "
            f"best validation top-1 {mean_std(gain, '+.2f')} points."
        )
    off = [r for r in rows.values() if r.get("mode") == "off"]
    on = [r for r in rows.values() if r.get("mode") == "on"]
    if off and on:
        per_epoch = statistics.mean(r["wall_seconds"] / r["epochs"] for r in on) - statistics.mean(
            r["wall_seconds"] / r["epochs"] for r in off
        )
        epoch = statistics.mean(r["epoch_seconds"] for r in off)
        spread = max(r["wall_seconds"] for r in off) - min(r["wall_seconds"] for r in off)
        verdict = "met" if per_epoch / epoch <= 0.02 else "NOT met"
        notes.append(
            f"tracking's overhead (distill stage, {len(off)} runs off and {len(on)} on, alternated; a local mlflow "
            f"server): {per_epoch:+.2f} s of command wall time per epoch against {epoch:.1f} s per epoch = "
            f"{100 * per_epoch / epoch:+.1f}% (target <= 2%: {verdict}); the spread of the untracked runs' wall time "
            f"alone is {spread:.1f} s."
        )
    write_table(
        "tune",
        "TPE with pruning against the grid: best validation top-1, its test top-1, training time",
        ["study", "seeds", "best validation top-1 %", "its test top-1 %", "training s (all trials)", "trials pruned"],
        out,
        notes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--part", choices=("all", "search", "overhead", "table"), default="all")
    parser.add_argument("--work", type=Path, default=Path("runs/tune-benchmark"))
    args = parser.parse_args()
    done = {r["key"]: r for r in load_rows(ROWS)}
    root = _split(args.archive, args.work, args)
    if args.part in ("all", "overhead"):
        _overhead(root, args.work, args, done)
        _table(args)
    if args.part in ("all", "search"):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in ("grid", "tpe"):
                if f"{seed}-{method}" not in done:
                    append_row(ROWS, _search(root, args.work, seed, method, args))
                    _table(args)
    _table(args)


if __name__ == "__main__":
    main()
