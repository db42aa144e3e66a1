"""Temperature / alpha search: one student per cell, all against the same teacher (trained once).

    edgedistill sweep RECIPE --temperature 1,2,3,5,10 --alpha 0.3,0.5,0.7,0.9

Each cell is a distillation step in ``<run>/sweep/T<T>-a<alpha>/`` with its own done.json and resumable
checkpoint, so a killed sweep continues where it stopped and finished cells are never retrained. After
every cell, ``sweep/results.csv`` and ``sweep/results.md`` are rewritten from the cells done so far; at the
end a heatmap (``sweep/heatmap.png``) and the best cell with the recipe lines to use. The best cell is
chosen on the validation split by the run's metric (``evaluate.metric``: top-1, balanced accuracy, ...); the
evaluation split (``test`` when the recipe has one) is reported beside it, and top-1 stays as a column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any, Optional

from edgedistill.data.loaders import eval_loader
from edgedistill.errors import EdgedistillError, RecipeError
from edgedistill.files import atomic_write_text
from edgedistill.judge.evaluate import classification_report
from edgedistill.models.predict import predict
from edgedistill.run.context import RunContext
from edgedistill.run.folder import STUDENT_SECTIONS, Step
from edgedistill.run.pipeline import run_stage
from edgedistill.run.training import check_teacher_floor, train_step

log = logging.getLogger(__name__)

COLUMNS = [
    "temperature",
    "alpha",
    "status",
    "val_top1",
    "eval_top1",
    "metric",
    "val_score",
    "eval_score",
    "eval_split",
    "retention",
    "train_s",
    "folder",
]


def parse_values(text: str, name: str) -> list[float]:
    """``--temperature`` (each > 0) or ``--alpha`` (each in [0, 1]) as sorted unique floats."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"--{name} takes comma-separated numbers, e.g. 1,2,3,5; got '{text}'") from None
    valid, rule = ((lambda v: v > 0), "> 0") if name == "temperature" else ((lambda v: 0 <= v <= 1), "in [0, 1]")
    if not values or not all(valid(v) for v in values):
        raise RecipeError(f"--{name}: give values {rule}, comma-separated; got '{text}'")
    return sorted(set(values))


def cell_key(temperature: float, alpha: float) -> str:
    return f"sweep/T{temperature:g}-a{alpha:g}"


def _train_seconds(folder) -> float:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return sum(
        json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if '"kind": "epoch"' in line
    )


def run_cell(ctx: RunContext, temperature: float, alpha: float, teacher_eval_score: float) -> dict[str, Any]:
    recipe = ctx.recipe.model_copy(
        update={"distill": ctx.recipe.distill.model_copy(update={"temperature": temperature, "alpha": alpha})}
    )
    cell = ctx.derive(recipe)
    key = cell_key(temperature, alpha)
    source = ctx.steps["distill"].teacher
    cell.steps[key] = Step(key, key, "student", recipe.student, source, STUDENT_SECTIONS)
    row: dict[str, Any] = {"temperature": temperature, "alpha": alpha, "folder": key, "eval_split": ""}
    try:
        report = train_step(cell, key)
    except EdgedistillError as exc:  # a diverging cell is a row with its status, not the end of the sweep
        log.warning("%s: %s", key, exc)
        return {**row, "status": f"failed: {str(exc).splitlines()[0][:120]}"}
    split = ctx.eval_split
    judged = _eval_report(cell, cell.trained_model(key, "sweep"))
    return {
        **row,
        "status": "ok",
        "val_top1": report["top1"],
        "eval_top1": judged["top1"],
        "metric": ctx.evaluation.metric,
        "val_score": report["score"],
        "eval_score": judged["score"],
        "eval_split": split.name,
        "retention": judged["score"] / teacher_eval_score if teacher_eval_score else 0.0,
        "train_s": round(_train_seconds(cell.stage_dir(key)), 1),
    }


def _eval_report(ctx: RunContext, model) -> dict[str, Any]:
    """A model on the evaluation split, scored on the run's metric (a threshold-based metric picks its threshold
    on the same split: a ranking, not the operating point's report)."""
    pred = predict(model.to(ctx.device), eval_loader(ctx.eval_split, ctx.recipe.data), ctx.device)
    return classification_report(pred, ctx.data.classes, ctx.evaluation)


def write_tables(ctx: RunContext, rows: list[dict[str, Any]], temperatures: list[float], alphas: list[float]) -> None:
    folder = ctx.run_dir / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "results.csv", buffer.getvalue())
    by_cell = {(r["temperature"], r["alpha"]): r for r in rows}
    best = best_cell(rows)
    lines = [
        f"# {ctx.recipe.name}: temperature / alpha sweep",
        "",
        f"Student `{ctx.recipe.student.model}`, teacher `{ctx.recipe.teacher.model}`; cells: validation "
        f"{ctx.evaluation.metric_title} % (evaluation split in brackets); best in bold; top-1 in results.csv.",
        "",
        "| T \\ alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |",
        "|---" * (len(alphas) + 1) + "|",
    ]
    for t in temperatures:
        cells = []
        for a in alphas:
            r = by_cell.get((t, a))
            if r is None:
                cells.append("–")
            elif r["status"] != "ok":
                cells.append(r["status"].split(":")[0])
            else:
                text = f"{r['val_score'] * 100:.2f} ({r['eval_score'] * 100:.2f})"
                cells.append(f"**{text}**" if r is best else text)
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: T = {best['temperature']:g}, alpha = {best['alpha']:g}: {recipe_lines(best)}"]
    atomic_write_text(folder / "results.md", "\n".join(lines) + "\n")


def best_cell(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    ok = [r for r in rows if r["status"] == "ok"]
    return max(ok, key=lambda r: (r["val_score"], r["eval_score"])) if ok else None


def recipe_lines(best: dict[str, Any]) -> str:
    return (
        f"`--set distill.temperature={best['temperature']:g} --set distill.alpha={best['alpha']:g}` "
        f"(in the recipe: `distill: {{temperature: {best['temperature']:g}, alpha: {best['alpha']:g}}}`)"
    )


def heatmap(ctx: RunContext, rows: list[dict[str, Any]], temperatures: list[float], alphas: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(temperatures), len(alphas)), np.nan)
    for r in rows:
        if r["status"] == "ok":
            grid[temperatures.index(r["temperature"]), alphas.index(r["alpha"])] = r["val_score"] * 100
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(alphas), 1.2 + 0.7 * len(temperatures)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_xlabel("alpha (weight of the KD term)")
    ax.set_ylabel("temperature T")
    best = best_cell(rows)
    for i, t in enumerate(temperatures):
        for j, a in enumerate(alphas):
            if not np.isnan(grid[i, j]):
                star = best is not None and (best["temperature"], best["alpha"]) == (t, a)
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.1f}{'*' if star else ''}",
                    ha="center",
                    va="center",
                    color="white" if grid[i, j] < np.nanmean(grid) else "black",
                    fontsize=9,
                )
    fig.colorbar(image, ax=ax, label=f"validation {ctx.evaluation.metric_title} %")
    ax.set_title(f"{ctx.recipe.student.model} from {ctx.recipe.teacher.model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.run_dir / "sweep" / "heatmap.png", dpi=120)
    plt.close(fig)


def run_sweep(ctx: RunContext, temperatures: list[float], alphas: list[float]) -> dict[str, Any]:
    if 1.0 in temperatures:
        log.warning(
            "sweep: T = 1 leaves the teacher's probabilities unsoftened; for a confident teacher they are "
            "close to hard labels, and KD adds little over CE"
        )
    run_stage(ctx, "teacher")
    check_teacher_floor(ctx, "sweep")
    run_stage(ctx, "assistant")
    teacher_score = _eval_report(ctx, ctx.trained_model("teacher", "sweep"))["score"]
    rows: list[dict[str, Any]] = []
    cells = [(t, a) for t in temperatures for a in alphas]
    for n, (t, a) in enumerate(cells, 1):
        log.info("sweep cell %d/%d: T = %g, alpha = %g", n, len(cells), t, a)
        rows.append(run_cell(ctx, t, a, teacher_score))
        write_tables(ctx, rows, temperatures, alphas)
    heatmap(ctx, rows, temperatures, alphas)
    best = best_cell(rows)
    if best is None:
        raise EdgedistillError(f"sweep: every cell failed; see {ctx.run_dir / 'sweep' / 'results.csv'}")
    log.info(
        "sweep: best cell T = %g, alpha = %g (validation %s %.2f%%, %s %.2f%%); use %s",
        best["temperature"],
        best["alpha"],
        ctx.evaluation.metric_title,
        best["val_score"] * 100,
        best["eval_split"],
        best["eval_score"] * 100,
        recipe_lines(best),
    )
    return {"best": best, "rows": rows, "teacher_eval_score": teacher_score}
