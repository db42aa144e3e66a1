"""INT8 that keeps the student's accuracy, for every TensorRT the targets run (8.2, 8.5, 10.x): the gate.

One explicit-quantization model, Q/DQ pairs placed by TensorRT's rules (``ship.qdq``), which TensorRT builds without
a calibrator; a layer left without Q/DQ runs in higher precision (FP16 when the engine allows it): that is how the
partial model keeps its most sensitive layers out of INT8.

Three ways to that model, tried in this order by ``export.int8: auto``:

1. PTQ: activation ranges calibrated once on the bundle's calibration images (ONNX Runtime's MinMax, Entropy or
   Percentile calibrators), weights' ranges from the weights.
2. Partial: each quantized layer's sensitivity is measured on the calibration images (R² of the outputs against
   the FP32 model's when that layer alone is left in floating point: label-free, so the gate's images that judge
   the result never choose it); in that order, each layer that brings the outputs closer to FP32 is kept out of
   INT8 until 1 - R² is under ``export.int8_max_drop`` or ``export.int8_keep_budget`` layers are kept.
3. Quantization-aware distillation (QAD): the trained student with fake quantization on exactly those layers
   (the same activation scales, per-channel weight scales), fine-tuned a few epochs at a low learning rate with
   the distillation loss against its FP32 teacher (``export.qad_teacher``: the run's teacher or the FP32 student);
   then exported and quantized by the same rules. Folding BatchNorm into a convolution scales each output channel,
   which per-channel weight scales absorb exactly, so the exported model computes what was trained.

The gate judges each attempt on the gate's images (a part of the evaluation split apart from the bundle's check
images, ``ship.gate``): with the line's reject threshold, each attempt gets its own threshold, re-picked on the
threshold's calibration images, and passes when the upper 95% bounds of its recall drop and false-reject rise
against FP32 are within ``export.int8_max_drop`` (a non-inferiority test; top-1 stays a column); without one, when
its top-1 (R² for regression) drops at most that much.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from torch import nn

from edgedistill.ship.fakequant import QuantPlan, module_for_node
from edgedistill.ship.qdq import activation_ranges, insert_qdq, qdq_violations, quantizable_nodes, residual_inputs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the three attempts
@dataclass
class Attempt:
    """One INT8 model tried on the host: how it was made, its quality, whether it passes the gate."""

    kind: str  # ptq | partial | qad
    path: Path
    score: float
    quality: dict[str, Any]
    drop: float
    kept: list[str] = field(default_factory=list)  # layers left out of INT8 (they run in FP16 on the device)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> Optional[dict[str, Any]]:
        """The line's non-inferiority test against FP32 (``ship.gate.LineGate.judge``), when the gate judged it."""
        return self.quality.get("line")

    def passes(self, limit: float) -> bool:
        """On the line's terms: the upper 95% bounds of recall drop and false-reject rise within the gate; else the
        drop of top-1 (R² for regression) on the gate's images."""
        return self.line["passes"] if self.line else self.drop <= limit

    def shortfall(self) -> float:
        """How far from passing, to rank attempts that all missed: the larger upper bound, else the drop."""
        if not self.line:
            return self.drop
        bounds = [self.line["recall_drop_upper"], self.line["false_reject_rise_upper"]]
        return max(float("inf") if b is None else b for b in bounds)


def agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    """Share of images on which two models' top-1 agree."""
    return float((reference.argmax(1) == logits.argmax(1)).mean())


def output_r2(reference: np.ndarray, outputs: np.ndarray) -> float:
    """How much of the FP32 outputs' variance the INT8 outputs reproduce (R² against FP32, mean over outputs: logits
    or regression targets); 1 is identical, 0 or below is an output that no longer follows the image."""
    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(outputs, dtype=np.float64)
    sst = np.maximum(((ref - ref.mean(0)) ** 2).sum(0), 1e-12)
    return float(np.mean(1 - ((ref - out) ** 2).sum(0) / sst))


def sensitivity(
    fp32: onnx.ModelProto,
    amax: dict[str, float],
    run: Callable[[onnx.ModelProto], np.ndarray],
    reference: np.ndarray,
    nodes: list[str],
    fidelity: Callable[[np.ndarray, np.ndarray], float] = output_r2,
) -> list[dict[str, Any]]:
    """Each quantized layer's share of the INT8 error, label-free on the calibration images: ``fidelity`` to the FP32
    model (R² of the outputs against FP32's: logits or regression targets) when everything is quantized, and when
    that layer alone is left in floating point. Rows sorted by what the layer recovers, most first.

    Not top-1 agreement: on an inspection line most images are good, and an INT8 model whose outputs no longer
    depend on the image (a crushed classifier input, say) still agrees with FP32's arg-max on every good image;
    the line's score is what it lost, and the logits show it."""
    full = fidelity(reference, run(insert_qdq(fp32, amax)))
    rows = []
    for name in nodes:
        alone_out = fidelity(reference, run(insert_qdq(fp32, amax, exclude=[name])))
        rows.append(
            {
                "layer": name,
                "fidelity_all_int8": full,
                "fidelity_without_it": alone_out,
                "recovered": alone_out - full,
            }
        )
    rows.sort(key=lambda r: r["recovered"], reverse=True)
    return rows


def keep_sensitive(
    rows: list[dict[str, Any]], budget: int, score: Callable[[list[str]], float], baseline: float, limit: float
) -> tuple[list[str], float, list[dict[str, Any]]]:
    """Greedy partial quantization: in sensitivity order, leave each layer out of INT8 when that lowers the drop
    (``baseline - score(kept)``, re-measured with every layer kept so far: layers interact, a float layer's output can
    make the next one fragile), until the drop is at most ``limit`` or ``budget`` layers are kept. Returns (kept, drop,
    every step tried)."""
    kept: list[str] = []
    steps = []
    drop = float("inf")
    for row in rows:
        if len(kept) >= budget or drop <= limit:
            break
        trial = baseline - score(kept + [row["layer"]])
        helps = trial < drop
        steps.append({"layer": row["layer"], "drop": trial, "kept": helps})
        if helps:
            kept.append(row["layer"])
            drop = trial
    return kept, drop, steps


# ------------------------------------------------------------------------------------------------ orchestration
@dataclass
class Int8Job:
    """What one export's INT8 work needs: the FP32 ONNX, its calibration batches, how to score a model on the gate's
    images (with the line's non-inferiority test when the bundle has a reject threshold) and how to run it on the
    calibration images (sensitivity), the settings."""

    fp32_path: Path
    workdir: Path
    calib: np.ndarray
    calib_batch: int
    score: Callable[[Path], dict[str, Any]]  # an ONNX file on the gate's images: {..., "score"[, "line"]}
    run_calib: Callable[[Path], np.ndarray]  # an ONNX file's outputs on the calibration images
    fp32_score: float
    mode: str  # ptq | partial | qad | auto
    method: str  # minmax | entropy | percentile
    limit: float  # export.int8_max_drop
    budget: int  # export.int8_keep_budget
    sensitivity_images: int
    qad: Optional[Callable[[QuantPlan], tuple[nn.Module, dict[str, Any]]]] = None  # what INT8 quantizes -> model, facts
    export_float: Optional[Callable[[nn.Module, Path], Path]] = None  # a float model -> simplified FP32 ONNX


def _save(model: onnx.ModelProto, path: Path) -> Path:
    problems = qdq_violations(model)
    if problems:  # our own inserter: a violation is a bug here, never the user's
        raise AssertionError("the INT8 model breaks TensorRT's explicit-quantization rules: " + "; ".join(problems[:3]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class _Attempts:
    """The INT8 models tried so far, each scored on the gate's images against the FP32 model."""

    def __init__(self, job: Int8Job):
        self.job = job
        self.made: list[Attempt] = []

    def add(self, kind: str, model: onnx.ModelProto, kept: list[str], **extra: Any) -> Attempt:
        job = self.job
        path = _save(model, job.workdir / f".int8-{kind}.onnx")
        quality = job.score(path)
        got = Attempt(kind, path, quality["score"], quality, job.fp32_score - quality["score"], kept, extra)
        self.made.append(got)
        log.info(
            "INT8 %s: score %.4f vs FP32 %.4f (drop %.4f, gate %.4f)%s%s",
            kind,
            got.score,
            job.fp32_score,
            got.drop,
            job.limit,
            f", {len(kept)} layer(s) kept in FP16" if kept else "",
            f"; {line_text(got.line)}" if got.line else "",
        )
        return got

    def passing(self) -> list[Attempt]:
        return [a for a in self.made if a.passes(self.job.limit)]


def _partial(
    job: Int8Job,
    fp32: onnx.ModelProto,
    amax: dict[str, float],
    nodes: list[str],
    tried: _Attempts,
    result: dict[str, Any],
) -> list[str]:
    """The partial model: layers kept out of INT8 in the order of their sensitivity on the calibration images
    (fidelity to FP32, no labels: the gate's images judge the result), until the gate or the budget; returns
    the kept layers, the sensitivity table in ``result``."""
    reference = job.run_calib(job.fp32_path)[: job.sensitivity_images]

    def on_calib(model: onnx.ModelProto) -> np.ndarray:
        return job.run_calib(_save(model, job.workdir / ".int8-probe.onnx"))[: job.sensitivity_images]

    rows = sensitivity(fp32, amax, on_calib, reference, nodes)
    kept, _, steps = keep_sensitive(
        rows, job.budget, lambda k: output_r2(reference, on_calib(insert_qdq(fp32, amax, exclude=k))), 1.0, job.limit
    )
    (job.workdir / ".int8-probe.onnx").unlink(missing_ok=True)
    for row in rows:
        row["kept"] = row["layer"] in kept
    result["sensitivity"] = rows
    result["partial_steps"] = steps
    tried.add("partial", insert_qdq(fp32, amax, exclude=kept), kept)
    return kept


def _qad(
    job: Int8Job, fp32: onnx.ModelProto, amax: dict[str, float], nodes: list[str], tried: _Attempts, kept: list[str]
) -> None:
    """Quantization-aware distillation of the student on the quantized layers' ranges, its float model exported and
    quantized by the same rules; with the partial layers kept when that alone misses the gate."""
    by_module = {
        module_for_node(n.name): amax[n.input[0]] for n in fp32.graph.node if n.name in nodes and n.input[0] in amax
    }
    plan = QuantPlan(by_module, residual_inputs(fp32, amax), job.fp32_path, job.calib[: job.calib_batch])
    trained, facts = job.qad(plan)
    qad_fp32 = job.export_float(trained, job.workdir / ".qad-fp32.onnx")
    qad_float = onnx.load(str(qad_fp32))
    qad_try = tried.add("qad", insert_qdq(qad_float, amax), [], **facts)
    if not qad_try.passes(job.limit) and kept:
        tried.add("qad+partial", insert_qdq(qad_float, amax, exclude=kept), kept, **facts)
    Path(qad_fp32).unlink(missing_ok=True)


def build_int8(job: Int8Job) -> dict[str, Any]:
    """Try PTQ, then (auto, partial) the partial model, then (auto, qad) quantization-aware distillation, until one
    passes the gate; write the chosen model to ``workdir/model.int8.onnx``. Returns what the manifest records:
    every attempt's quality and drop, the sensitivity table, the kept layers, the chosen attempt, its status and,
    when INT8 is rejected, the advice with the next recipe line."""
    fp32 = onnx.load(str(job.fp32_path))
    amax = activation_ranges(job.fp32_path, job.calib, job.calib_batch, job.method, job.workdir)
    nodes = quantizable_nodes(fp32)
    tried = _Attempts(job)
    result: dict[str, Any] = {"layers": len(nodes), "calibration": job.method}
    ptq = tried.add("ptq", insert_qdq(fp32, amax), [])
    kept: list[str] = []
    if not ptq.passes(job.limit) and job.mode in ("auto", "partial"):
        kept = _partial(job, fp32, amax, nodes, tried, result)
    wants_qad = job.mode == "qad" or (job.mode == "auto" and not tried.passing())
    if wants_qad and job.qad is not None and job.export_float is not None:
        _qad(job, fp32, amax, nodes, tried, kept)
    passing = tried.passing()
    if job.mode == "qad":
        passing = [a for a in passing if a.kind.startswith("qad")] or passing
    chosen = passing[0] if passing else min(tried.made, key=lambda a: a.shortfall())
    chosen.path.replace(job.workdir / "model.int8.onnx")
    for a in tried.made:
        a.path.unlink(missing_ok=True)
    result["attempts"] = {
        a.kind: {
            **{k: v for k, v in a.quality.items() if k != "score"},
            "drop": a.drop,
            "kept_fp16": a.kept,
            "passes": a.passes(job.limit),
            **a.extra,
        }
        for a in tried.made
    }
    result.update(
        {
            "chosen": chosen.kind,
            "kept_fp16": chosen.kept,
            "drop": chosen.drop,
            "status": "accepted" if chosen.passes(job.limit) else "rejected",
            "quality": {k: v for k, v in chosen.quality.items() if k != "score"},
            "line": chosen.line,
        }
    )
    result["advice"] = gate_advice(result, job)
    return result


def line_text(line: dict[str, Any]) -> str:
    """One attempt's non-inferiority test in words."""

    def pts(v: Optional[float]) -> str:
        return "-" if v is None else f"{v * 100:+.2f}"

    return (
        f"at its own threshold {line['threshold']:.4f}: recall drop {pts(line['recall_drop'])} points (upper 95% "
        f"bound {pts(line['recall_drop_upper'])}), false-reject rise {pts(line['false_reject_rise'])} (bound "
        f"{pts(line['false_reject_rise_upper'])}) on {line['positives']} defective and {line['negatives']} good gate "
        "images"
    )


def gate_advice(result: dict[str, Any], job: Int8Job) -> str:
    """What was tried, with what drop, and the recipe line for the next remedy ('' when INT8 passed)."""
    tried = []
    names = {"ptq": f"PTQ ({job.method})", "partial": "partial", "qad": "QAD", "qad+partial": "QAD + partial"}
    for kind, a in result["attempts"].items():
        what = names[kind] + (f", {len(a['kept_fp16'])} layer(s) kept in FP16" if a["kept_fp16"] else "")
        if kind.startswith("qad") and a.get("epochs"):
            what += f", {a['epochs']} epoch(s)"
        line = a.get("line")
        tried.append(f"{what}: " + (line_text(line) if line else f"drop {a['drop'] * 100:.2f} points"))
    text = "; ".join(tried)
    gate = (
        f"the {job.limit * 100:.2f}-point non-inferiority gate on recall and false-reject"
        if result.get("line")
        else f"the {job.limit * 100:.2f}-point gate"
    )
    if result["status"] == "accepted":
        return f"INT8 {result['chosen']} passes {gate} ({text})"
    kinds = set(result["attempts"])
    if "qad" in kinds:
        epochs = result["attempts"]["qad"].get("epochs") or 1
        nxt = (
            f"--set export.qad_epochs={2 * epochs} (longer quantization-aware distillation), or "
            f"--set export.int8_keep_budget={2 * job.budget} (more layers in FP16)"
        )
    elif "partial" in kinds:
        nxt = "--set export.int8=qad (quantization-aware distillation, against the FP32 teacher)"
    else:
        nxt = "--set export.int8=auto (sensitivity-guided partial INT8, then quantization-aware distillation)"
    line = result.get("line")
    small = f"; {limited_by(line)}" if line and line["positives"] else ""
    return f"INT8 rejected: {text}, over {gate}{small}; next: {nxt}"


def limited_by(line: dict[str, Any]) -> str:
    """Which images leave the recall bound wide: the gate's (few defective parts, each a step of 1/P) or the
    calibration split's (each variant's threshold moves with it), from the bound with the thresholds held."""
    held = line.get("recall_drop_upper_gate_only")
    step = f"the gate images hold {line['positives']} defective parts (one is {100 / line['positives']:.2f} points)"
    if held is None or "calibration_positives" not in line:  # a gate judged before the split was recorded
        return f"{step}: export.gate_samples, more images, narrow the bound"
    cal = f"{line['calibration_positives']} defective and {line['calibration_negatives']} good calibration images"
    if held <= line["margin"] + 1e-12:
        return (
            f"with the thresholds held the recall bound is {held * 100:+.2f} points: the thresholds' own uncertainty "
            f"({cal}) is what the gate cannot rule out; more calibration images (the evaluate stage's split) "
            "narrow it, more gate images do not"
        )
    return (
        f"with the thresholds held the recall bound is still {held * 100:+.2f} points: {step}; more gate images "
        f"(export.gate_samples) narrow it, and then the thresholds' uncertainty ({cal})"
    )
