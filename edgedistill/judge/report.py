"""The run's report: report.md + report_files/ and report.html (the plots inlined: one file to send), read from a
finished run folder and, optionally, device measurements (``edgerun bench/validate/camera --json``)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from edgedistill.judge.plots import device_rows, figures
from edgedistill.judge.summary import cost_line, summary_facts, summary_rows


def _read_json(path) -> Optional[dict]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epoch_records(path) -> list[dict[str, Any]]:
    """The per-epoch records of a step's metrics.jsonl (losses, top-1, seconds); [] when it is unreadable."""
    import json

    rows = []
    try:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "epoch":
                rows.append(record)
    except (OSError, ValueError):
        return []
    return rows


def _measured_kind(data: dict) -> str:
    if "result" in data and "verdict" in data:
        return "bench"
    if "end_to_end_fps" in data:
        return "camera"
    if "top1" in data and "max_drop" in data:
        return "validate"
    return "unknown"


def collect_report(run_dir, measured: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the report shows, read from a finished run folder (and device JSON files, if given)."""
    from edgedistill.errors import EdgedistillError
    from edgedistill.judge.evaluate import load_summary

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    curves = {p.parent.name: epoch_records(p) for p in sorted(run_dir.glob("*/metrics.jsonl"))}
    reports = {p.parent.name: _read_json(p) for p in sorted(run_dir.glob("*/report.json"))}
    manifest = _read_json(run_dir / "bundle" / "manifest.json")
    device = []
    for path in measured:
        data = _read_json(Path(path))
        if data is None:
            raise EdgedistillError(
                f"--measured {path}: not a readable JSON file from edgerun (bench/validate/camera --json)"
            )
        kind = _measured_kind(data)
        if kind == "unknown":
            raise EdgedistillError(
                f"--measured {path}: neither an `edgerun bench --json`, `validate --json` nor `camera --json` file"
            )
        device.append({"path": str(path), "kind": kind, "data": data})
    return {
        "summary": summary,
        "curves": {k: v for k, v in curves.items() if v},
        "reports": reports,
        "manifest": manifest,
        "device": device,
        "run_dir": str(run_dir),
        "fleet": _read_json(run_dir / "devices" / "fleet.json"),
    }


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


Section = Optional[tuple[str, list[str]]]  # (title, markdown lines), or None when the run has nothing for it


def _models(info: dict[str, Any]) -> Section:
    s = info["summary"]
    rows = summary_rows(s, s["latency_batch"])
    return (
        "Teacher, student and baseline",
        _md_table(rows[0], rows[1:])
        + [""]
        + [f"- {fact}" for fact in summary_facts(s)]
        + ["", f"**Verdict:** {s['verdict']}"],
    )


def _per_target(info: dict[str, Any]) -> Section:
    s = info["summary"]
    if s.get("task") != "regression":
        return None
    rows = [
        (
            name,
            *(
                f"{s[r]['per_target'][name]['mae']:.4g} / {s[r]['per_target'][name]['r2']:.3f}"
                for r in ("teacher", "student", "baseline")
            ),
        )
        for name in s["targets"]["names"]
    ]
    return "Per target (MAE / R²)", _md_table(["target", "teacher", "student", "baseline"], rows)


def _teacher_validation(info: dict[str, Any]) -> Section:
    teacher = info["reports"].get("teacher")
    if not teacher or info["summary"].get("task") == "regression":  # classification facts
        return None
    per_class = [(c, "-" if v is None else f"{100 * v:.1f}%") for c, v in teacher["per_class"].items()]
    return (
        "Teacher validation",
        [
            f"top-1 {100 * teacher['top1']:.2f}% on {teacher['samples']} images; "
            f"expected calibration error {teacher['ece']:.4f} (15 bins)",
            "",
        ]
        + _md_table(["class", "teacher accuracy"], per_class),
    )


def _per_class(info: dict[str, Any]) -> Section:
    s = info["summary"]
    roles = [r for r in ("teacher", "student", "baseline") if isinstance((s.get(r) or {}).get("per_class"), dict)]
    if not roles or s.get("task") == "regression":
        return None
    prf = {r: s[r]["per_class"] for r in roles}
    rows = [
        (
            c,
            str(prf[roles[0]][c]["support"]),
            *(
                f"{100 * prf[r][c]['precision']:.1f} / {100 * prf[r][c]['recall']:.1f} / {100 * prf[r][c]['f1']:.1f}"
                for r in roles
            ),
        )
        for c in prf[roles[0]]
    ]
    return (
        f"Per class on the {s['eval_split']} split: precision / recall / F1 (%)",
        _md_table(["class", "images", *roles], rows),
    )


def _operating_point(info: dict[str, Any]) -> Section:
    s = info["summary"]
    op = s.get("operating_point")
    if not op:
        return None
    ordered = [r for r in ["teacher"] + [a["role"] for a in s.get("chain", [])] + ["student", "baseline"] if r in op]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    rows = [
        (
            r,
            f"{op[r]['threshold']:.4f}",
            pct(op[r]["calibration"]["recall"]),
            pct(op[r]["calibration"]["false_reject"]),
            f"{pct(op[r]['recall'])} [{pct(op[r]['recall_interval'][0])}, {pct(op[r]['recall_interval'][1])}]",
            f"{pct(op[r]['false_reject'])} [{pct(op[r]['false_reject_interval'][0])}, "
            f"{pct(op[r]['false_reject_interval'][1])}]",
        )
        for r in ordered
    ]
    return (
        f"Operating point: {op['rule']}",
        [
            f"Each model's threshold on its {s['metric']['positive_class']} probability is picked on "
            f"`{op['calibration_split']}` and reported on `{s['eval_split']}` (95% bootstrap intervals).",
            "",
        ]
        + _md_table(
            [
                "model",
                "threshold",
                f"recall on {op['calibration_split']} (picked there: in-sample)",
                f"false-reject on {op['calibration_split']} (in-sample)",
                f"recall on {s['eval_split']}",
                f"false-reject on {s['eval_split']}",
            ],
            rows,
        )
        + _comparison_lines(op),
    )


def _comparison_lines(op: dict[str, Any]) -> list[str]:
    """The student against its baseline where the line operates, each at its own threshold (the verdict's test)."""
    cmp = op.get("comparison")
    if not cmp:
        return []
    sig, (lo, hi) = cmp["significance"], cmp["gain_interval"]
    measure = cmp["measure"].replace("_", "-")
    return [
        "",
        f"Student against baseline at matched {cmp['matched']}: {measure} {100 * cmp['student']:.1f}% vs "
        f"{100 * cmp['baseline']:.1f}%, the student's advantage {100 * cmp['gain']:+.1f} points (95% interval "
        f"{100 * lo:+.1f} to {100 * hi:+.1f}), McNemar p = {sig['p_value']:.3g} on {sig['images']} images "
        f"({sig['note']}).",
    ]


def _int8_attempts(int8: dict[str, Any], regression: bool) -> list[str]:
    """The INT8 gate's table: each attempt's top-1, drop and layers kept in FP16, the advice, the sensitive layers."""
    names = {"ptq": "PTQ", "partial": "partial", "qad": "QAD", "qad+partial": "QAD + partial"}
    lines = [
        "",
        "INT8 on the host (ONNX Runtime, explicit Q/DQ by TensorRT's rules, on the gate's images: they chose the "
        "variant, so these figures are in-sample for that choice; the bundle's check images, apart, chose nothing):",
        "",
    ]
    fp32_top1 = (int8.get("fp32_gate") or {}).get("top1", int8["fp32_top1"])
    judged = any(a.get("line") for a in int8["attempts"].values())
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    bound = lambda v: "–" if v is None else f"{100 * v:+.2f}"  # noqa: E731

    def line_cells(line: Optional[dict[str, Any]], fp32: bool = False) -> tuple:
        if not judged:
            return ()
        if line is None:
            return ("–",) * 4
        if fp32:
            return (f"{line['fp32_threshold']:.4f}", pct(line["fp32_recall"]), pct(line["fp32_false_reject"]), "–")
        return (
            f"{line['threshold']:.4f}",
            pct(line["recall"]),
            pct(line["false_reject"]),
            f"{bound(line['recall_drop_upper'])} / {bound(line['false_reject_rise_upper'])}",
        )

    first = next((a["line"] for a in int8["attempts"].values() if a.get("line")), None)
    rows = [("FP32", f"{100 * fp32_top1:.2f}%", "–", "–", *line_cells(first, fp32=True), "–")]
    rows += [
        (
            names[k],
            f"{100 * a['top1']:.2f}%",
            f"{100 * a['drop']:+.2f}",
            str(len(a["kept_fp16"])),
            *line_cells(a.get("line")),
            "ships"
            if k == int8.get("chosen") and int8.get("status") == "accepted"
            else ("passes" if a["passes"] else "over the gate"),
        )
        for k, a in int8["attempts"].items()
    ]
    header = ["model", "top-1", "drop (points)", "layers in FP16"]
    if judged:
        header += ["own threshold", "recall", "false-reject", "upper 95% bound: recall drop / false-reject rise"]
    lines += _md_table([*header, ""], rows) + [""]
    lines.append(f"- {int8['advice']}")
    if int8.get("sensitivity"):
        top = int8["sensitivity"][:10]
        outputs = "outputs" if regression else "logits"
        lines += [
            "",
            f"Layer sensitivity on the calibration images (R² of the {outputs} against FP32's, with every layer in "
            "INT8 and "
            f"with that layer alone in floating point; {len(int8['sensitivity'])} layers, the 10 most "
            "sensitive):",
            "",
        ]
        lines += _md_table(
            ["layer", "all INT8", "without it", "recovered", "kept in FP16"],
            [
                (
                    r["layer"],
                    # runs exported before the R² measure carry top-1 agreement under its old keys
                    f"{r.get('fidelity_all_int8', r.get('agreement_all_int8', float('nan'))):.3f}",
                    f"{r.get('fidelity_without_it', r.get('agreement_without_it', float('nan'))):.3f}",
                    f"{r['recovered']:+.3f}",
                    "yes" if r["kept"] else "no",
                )
                for r in top
            ],
        )
    return lines


def _export(info: dict[str, Any]) -> Section:
    manifest = info.get("manifest")
    if not manifest:
        return None
    metrics = manifest.get("metrics") or {}
    int8, parity = metrics.get("int8") or {}, metrics.get("parity") or {}
    lines = []
    regression = manifest.get("task") == "regression"
    if parity:
        lines.append(
            f"- ONNX Runtime vs PyTorch on {parity.get('samples')} held-out images: max abs error "
            f"{parity.get('max_abs_error', float('nan')):.2e}"
            + ("" if regression else f", top-1 agreement {100 * parity.get('top1_agreement', 0):.2f}%")
        )
    if int8.get("int8") and regression:
        lines.append(
            f"- host INT8 (ONNX Runtime, QDQ): R² {int8['int8']['r2']:.4f}, MAE {int8['int8']['mae']:.4g} vs "
            f"FP32 R² {int8['fp32_r2']:.4f}, MAE {int8['fp32_mae']:.4g} (R² drop {int8['int8']['drop']:.4f}, "
            f"{int8['int8']['status']})"
        )
    elif int8.get("attempts"):
        lines += _int8_attempts(int8, regression)
    elif int8.get("int8"):
        lines.append(
            f"- host INT8 (ONNX Runtime, QDQ): top-1 {100 * int8['int8']['top1']:.2f}% vs FP32 "
            f"{100 * int8['fp32_top1']:.2f}% (drop {100 * int8['int8']['drop']:.2f} points, "
            f"{int8['int8']['status']})"
        )
    lines.append(
        f"- bundle for `{manifest.get('target')}`: `edgedistill pack {info['run_dir']}/bundle -o "
        f"{manifest.get('name')}.edb`"
    )
    return "Export: parity and INT8 on the host", lines


def _device(info: dict[str, Any]) -> Section:
    est = info["summary"].get("device_estimate")
    dev = device_rows(info)
    lines = []
    if est:
        lines.append(
            f"ESTIMATES (edgedistill plan, {est['device']}, {est['precision'].upper()}, {est['image_size']} px; "
            f"not measurements; 90% intervals from the planner's held-out error): teacher "
            f"{est['teacher']['est_fps']:.0f} FPS ({est['teacher'].get('est_fps_lo', 0):.0f}-"
            f"{est['teacher'].get('est_fps_hi', 0):.0f}), student {est['student']['est_fps']:.0f} FPS "
            f"({est['student'].get('est_fps_lo', 0):.0f}-{est['student'].get('est_fps_hi', 0):.0f}; "
            f"{est['student'].get('basis', '')}), student process memory {est['student']['est_memory_mb']:.0f} MB"
        )
    if dev:
        lines += [""] + _md_table(
            ["quantity", "expected (planner estimate or host figure)", "measured", "file"],
            [
                (
                    r["what"],
                    "-" if r["estimated"] is None else f"{r['estimated']:.1f}",
                    "-" if r["measured"] is None else f"{r['measured']:.1f}",
                    r["source"],
                )
                for r in dev
            ],
        )
    elif est:
        lines.append("")
        lines.append(
            "no device measurement given: run `edgerun bench BUNDLE --engine E --json bench.json` on the "
            "board and `edgedistill report RUN --measured bench.json`"
        )
    return ("Device", lines) if lines else None


def _fleet(info: dict[str, Any]) -> Section:
    fleet = info.get("fleet")
    if not fleet:
        return None
    from edgedistill.deploy.fleet import fleet_table

    rel = fleet["release"]
    return (
        "Fleet (edgedistill deploy)",
        [
            f"Release {rel['version']} of `{rel['name']}` ({fleet['precision']}"
            + (f", camera {fleet['source']}" if fleet.get("source") else "")
            + "); measured on each board, results in "
            f"`{info['run_dir']}/devices/<board>/`.",
            "",
        ]
        + fleet_table(fleet["rows"]),
    )


def _cost(info: dict[str, Any]) -> Section:
    s = info["summary"]
    if not s.get("cost"):
        return None
    return (
        "Cost",
        [
            f"- {cost_line(s['cost'])}",
            "- prices are the recipe's inputs; try others with "
            f"`edgedistill cost {info['run_dir']} --price-per-hour P --distillation-cost C`",
        ],
    )


# one function per section, in reading order
SECTIONS = (_models, _per_target, _teacher_validation, _per_class, _operating_point, _export, _device, _fleet, _cost)


def report_sections(info: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, markdown lines) of every section the run has; shared by report.md and report.html."""
    return [section for section in (make(info) for make in SECTIONS) if section is not None]


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _md_to_html(lines: list[str]) -> str:
    """The report's Markdown subset (tables, bullets, paragraphs, bold, code) as HTML."""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not row.startswith("|---")]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                + "</table>"
            )
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "font-size:13px}th{background:#f0f0f0}img.plot{max-width:100%}code{background:#f4f4f4}"
    "figcaption{font-size:12px;color:#555}"
)


def _html_page(s: dict[str, Any], sections: list, plots: dict[str, bytes]) -> str:
    """report.html: one self-contained page, the plots inlined as data URIs (it reaches no network)."""
    body = [
        f"<h1>{html.escape(s['name'])}: distillation report</h1>",
        f"<p>Evaluated on <code>{html.escape(s['eval_split'])}</code> ({s['eval_samples']} images).</p>",
    ]
    for title, lines in sections:
        body += [f"<h2>{html.escape(title)}</h2>", _md_to_html(lines)]
    body.append("<h2>Plots</h2>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(
            f'<figure><img class="plot" alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(s["name"]) + " report</title>"
        f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>"
    )


def write_report(run_dir, measured: Sequence[str] = ()) -> tuple[Any, Any]:
    """report.md (+ report_files/*.png) and report.html (one self-contained file, images inlined) in the run."""
    info = collect_report(run_dir, measured)
    run_dir = Path(run_dir)
    s = info["summary"]
    plots = figures(info)
    sections = report_sections(info)
    files = run_dir / "report_files"
    files.mkdir(exist_ok=True)
    slug = {name: re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] + ".png" for name in plots}
    for name, png in plots.items():
        (files / slug[name]).write_bytes(png)
    md = [
        f"# {s['name']}: distillation report",
        "",
        f"Evaluated on `{s['eval_split']}` ({s['eval_samples']} images).",
        "",
    ]
    for title, lines in sections:
        md += [f"## {title}", ""] + lines + [""]
    md += ["## Plots", ""] + [f"![{name}](report_files/{slug[name]})\n" for name in plots]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))
    html_path = run_dir / "report.html"
    html_path.write_text(_html_page(s, sections, plots))
    return html_path, md_path
