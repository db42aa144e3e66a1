"""Export a trained student to a device bundle: ONNX with a parity proof, samples, host INT8, manifest.

The bundle is assembled in a temporary folder and renamed into place only when every check passed, so a
failed export (an operator the target cannot take, parity above tolerance) writes nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
import torch
from torch import nn

from edgedistill import __version__
from edgedistill.data.images import eval_spec
from edgedistill.data.splits import Split
from edgedistill.errors import ExportError, RecipeError
from edgedistill.recipe.outputs import ExportConfig
from edgedistill.ship.onnx import INPUT_NAME, OUTPUT_NAME, check_operators, export_onnx, ort_outputs, parity, simplify
from edgerun.bundle.manifest import sha256_file, write_manifest
from edgerun.preprocess import PreprocessSpec, center_crop, preprocess, resize_shorter_side
from edgerun.profiles import get_target

log = logging.getLogger(__name__)


MODEL_FILE = "model.onnx"

CALIB_FILE = "calib.npy"

VAL_FILE = "val.npz"


def raw_validation_images(split: Split, indices: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 RGB images for val.npz: as decoded when all share one size, else resized to ``spec.resize``
    on the shorter side and centre-cropped square (the device's preprocess then reproduces the host's crop)."""
    images = [split.original(int(i)) for i in indices]
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    side = spec.resize
    return np.stack(
        [
            center_crop(
                resize_shorter_side(im if im.ndim == 3 else im[:, :, None], side, spec.interpolation), (side, side)
            )
            for im in images
        ]
    )


def _pick(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def quality(
    path: Path,
    batches: np.ndarray,
    labels: np.ndarray,
    cfg: ExportConfig,
    targets: Optional[dict] = None,
    decision: Optional[dict] = None,
    threshold: Optional[float] = None,
) -> dict[str, float]:
    """The ONNX model's quality on held-out images: ``top1`` (and, with a ``decision`` threshold, the recall and
    false-reject rate of its positive class there, at ``threshold`` when given: a variant's own); or, with
    regression ``targets`` (labels in target units), ``r2`` and ``mae``. ``score`` is the one compared across
    variants."""
    outputs = ort_outputs(path, batches, cfg.batch, cfg.dynamic_batch)
    if targets is None:
        top1 = float((outputs.argmax(1) == labels).mean())
        out = {"top1": top1, "score": top1}
        if decision and decision.get("threshold") is not None:
            from edgerun.decision import positive_scores, rates_at

            index = decision["positive_index"]
            at = decision["threshold"] if threshold is None else threshold
            rates = rates_at(np.asarray(labels) == index, positive_scores(outputs, index), at)
            out.update(recall=rates["recall"], false_reject=rates["false_reject"], threshold=float(at))
        return out
    from edgerun.regression import restore, summarize

    got = summarize(restore(targets, outputs), np.asarray(labels, dtype=np.float64), targets["names"])
    return {"r2": got["r2"], "mae": got["mae"], "score": got["r2"]}


@dataclass
class ExportJob:
    """What ``build_bundle`` ships: the trained ``model`` into the folder ``out_dir`` under ``name``, its classes, the
    training split (INT8 calibration images) and the evaluation split ``val`` (images no stage chose anything on:
    parity, the INT8 gate's images and, apart from those, the check images the device validates on), the recipe's
    data and export sections, the seed, the checkpoint it came from, its source facts and the host's metrics.

    ``targets`` (regression: {names, mean, std}) makes a regression bundle: val.npz holds target values in target
    units, the manifest carries the scaling, INT8 is judged by its R² drop. ``decision`` ({metric, positive_class,
    threshold, ...}: the evaluate stage's operating point) goes into the manifest for the device's reject decision;
    with ``threshold_images`` (the evaluate stage's calibration split) and ``pick_threshold`` (its rule: positives,
    scores -> threshold) every INT8 variant gets its own threshold there and the gate is the line's non-inferiority
    test (``ship.gate``). ``qad`` trains the fake-quantized student when ``export.int8`` reaches quantization-aware
    distillation (``ship.int8``); ``teacher`` ships the teacher as ``teacher.onnx`` for comparison."""

    model: nn.Module
    out_dir: Path
    name: str
    classes: list[str]
    train: Split
    val: Split
    data_cfg: Any  # the recipe's data section: image size and the evaluation preprocessing
    cfg: ExportConfig
    seed: int
    checkpoint: Path
    source: dict[str, Any]
    host_metrics: dict[str, Any]
    recipe_yaml: str
    teacher: Optional[nn.Module] = None
    targets: Optional[dict] = None
    decision: Optional[dict] = None
    qad: Optional[Callable[[Any], tuple[nn.Module, dict[str, Any]]]] = None  # ship.fakequant.QuantPlan -> model, facts
    threshold_images: Optional[Split] = None
    pick_threshold: Optional[Callable[[np.ndarray, np.ndarray], float]] = None


@dataclass
class _Build:
    """One export in progress: its job, the temporary folder, the target, the opset, the model's input shape, the
    evaluation preprocessing and the exported ONNX model."""

    job: ExportJob
    tmp: Path
    target: dict[str, Any]
    opset: int
    shape: tuple
    prep: PreprocessSpec
    onnx_path: Path


@dataclass
class _HeldOut:
    """Images of the evaluation split, in two disjoint parts (``ship.gate.split_apart``): the check images the bundle
    carries (raw, with their labels or targets, and preprocessed: the host's figures for the device and its own
    check) and the gate's images (preprocessed, with their labels: the INT8 gate chooses the variant on them)."""

    indices: np.ndarray
    raw: np.ndarray
    labels: np.ndarray
    batches: np.ndarray
    gate_indices: np.ndarray
    gate_labels: np.ndarray
    gate_batches: np.ndarray

    def check(self, b: "_Build") -> tuple:
        """``quality``'s arguments for the check images."""
        return self.batches, self.labels, b.job.cfg, b.job.targets, b.job.decision

    def gate(self, b: "_Build") -> tuple:
        """``quality``'s arguments for the gate's images."""
        return self.gate_batches, self.gate_labels, b.job.cfg, b.job.targets, b.job.decision


def _line_gate(b: _Build, held: _HeldOut) -> tuple[Optional[Any], Optional[np.ndarray]]:
    """(the line's gate, the threshold images preprocessed as the device does) when the bundle has a reject threshold
    and the run gave its calibration images and rule; (None, None) otherwise (the gate then compares top-1)."""
    from edgedistill.ship.gate import LineGate

    job, cfg = b.job, b.job.cfg
    decision = job.decision or {}
    if decision.get("threshold") is None or job.threshold_images is None or job.pick_threshold is None:
        return None, None
    split = job.threshold_images
    batches = preprocess([split.original(i) for i in range(len(split))], b.prep)
    gate = LineGate(
        positive_index=decision["positive_index"],
        calib_labels=np.asarray(split.labels),
        gate_labels=np.asarray(held.gate_labels),
        fp32_calib=ort_outputs(b.onnx_path, batches, cfg.batch, cfg.dynamic_batch),
        fp32_gate=ort_outputs(b.onnx_path, held.gate_batches, cfg.batch, cfg.dynamic_batch),
        pick=job.pick_threshold,
        margin=cfg.int8_max_drop,
        seed=job.seed,
    )
    return gate, batches


def _int8(b: _Build, calib: np.ndarray, held: _HeldOut, fp32_score: float) -> dict[str, Any]:
    """The bundle's INT8 model (``ship.int8.build_int8``): PTQ, partial, QAD as ``export.int8`` asks, each judged on
    the gate's images: on the line's terms (``ship.gate.LineGate``) when the bundle has a reject threshold."""
    from edgedistill.ship.int8 import Int8Job, build_int8

    cfg = b.job.cfg
    batch = cfg.batch if not cfg.dynamic_batch else 1
    line, line_images = _line_gate(b, held)

    def export_float(model: nn.Module, path: Path) -> Path:
        export_onnx(model, path, b.shape, b.opset, cfg.dynamic_batch)
        if cfg.simplify:
            simplify(path)
        check_operators(onnx.load(str(path)), b.target, b.opset)
        return path

    def score(path: Path) -> dict[str, Any]:
        batches, labels, _, targets, decision = held.gate(b)
        if line is None:
            return quality(path, batches, labels, cfg, targets, decision)
        got = quality(path, batches, labels, cfg, targets)  # top-1 stays a column; the line judges
        run = lambda images: ort_outputs(path, images, cfg.batch, cfg.dynamic_batch)  # noqa: E731
        got["line"] = line.judge(run(line_images), run(held.gate_batches))
        return got

    job = Int8Job(
        fp32_path=b.onnx_path,
        workdir=b.tmp,
        calib=calib,
        calib_batch=batch,
        score=score,
        run_calib=lambda path: ort_outputs(path, calib[: cfg.int8_sensitivity_images], cfg.batch, cfg.dynamic_batch),
        fp32_score=fp32_score,
        mode=cfg.int8,
        method=cfg.int8_method,
        limit=cfg.int8_max_drop,
        budget=cfg.int8_keep_budget,
        sensitivity_images=cfg.int8_sensitivity_images,
        qad=b.job.qad,
        export_float=export_float,
    )
    return build_int8(job)


def _deepstream(b: _Build, int8: Optional[dict], indices: np.ndarray, decision: Optional[dict]) -> dict[str, Any]:
    """The bundle's deepstream/ (``deepstream.write``) and the host top-1 under DeepStream's preprocessing, measured
    on the validation images as they decode (a camera frame is not centre-cropped by nvinfer either)."""
    from edgedistill.ship import deepstream, nvinfer

    job, cfg = b.job, b.job.cfg
    int8_file = b.tmp / int8["file"] if int8 and int8.get("status") == "accepted" else None
    files = deepstream.write(
        deepstream.DeepStreamJob(
            folder=b.tmp / deepstream.FOLDER,
            bundle_model=b.onnx_path,
            manifest_model={"input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_shape": list(b.shape)},
            classes=job.classes,
            spec=b.prep,
            folded=cfg.input == "uint8",
            batch=cfg.batch,
            int8_file=int8_file,
            decision=decision,
            source=cfg.deepstream_source,
            camera=cfg.deepstream_camera,
            name=job.name,
        )
    )
    host = nvinfer.host_accuracy(
        b.onnx_path,
        b.tmp / deepstream.FOLDER / deepstream.MODEL,
        [job.val.original(int(i)) for i in indices],
        job.val.labels[indices],
        b.prep,
        files,
        cfg.batch,
        cfg.dynamic_batch,
    )
    host.update(exact_normalization=files["exact_normalization"], input=files["input"])
    log.info(
        "DeepStream preprocessing on the host: top-1 %.2f%% against the bundle's %.2f%% (%+.2f points, %s)",
        host["deepstream_top1"] * 100,
        host["bundle_top1"] * 100,
        host["difference"] * 100,
        files["note"],
    )
    return {"files": files, "host": host}


def _target_and_opset(cfg: ExportConfig) -> tuple[dict[str, Any], int]:
    target = get_target(cfg.target)
    opset = cfg.opset or target["max_opset"]
    if opset > target["max_opset"]:
        raise RecipeError(
            f"export.opset {opset} is above what target {cfg.target} takes (at most "
            f"{target['max_opset']}, TensorRT {target.get('tensorrt')})"
        )
    if cfg.dynamic_batch and not (cfg.batch <= cfg.max_batch):
        raise RecipeError("export.batch (the optimal batch) must be at most export.max_batch")
    return target, opset


def _export_checked(b: _Build) -> bool:
    """The student as ONNX at ``b.onnx_path``, checked by ONNX's checker and against the target's operators, then
    simplified (and checked again) when ``export.simplify``; returns whether it was simplified."""
    cfg = b.job.cfg
    export_onnx(b.job.model, b.onnx_path, b.shape, b.opset, cfg.dynamic_batch)
    proto = onnx.load(str(b.onnx_path))
    onnx.checker.check_model(proto)
    check_operators(proto, b.target, b.opset)
    simplified = cfg.simplify and simplify(b.onnx_path)
    if simplified:
        proto = onnx.load(str(b.onnx_path))
        onnx.checker.check_model(proto)
        check_operators(proto, b.target, b.opset)
    return simplified


def _held_out(b: _Build) -> tuple[_HeldOut, dict[str, Any]]:
    """Images of the evaluation split, apart: the check images (written to val.npz: the device's own check) and the
    INT8 gate's (``ship.gate.split_apart``); and the parity of the ONNX model with PyTorch on both."""
    job, cfg = b.job, b.job.cfg
    from edgedistill.ship.gate import split_apart

    labels = None if job.targets is not None else np.asarray(job.val.labels)
    check_idx, gate_idx = split_apart(labels, len(job.val), cfg.val_samples, cfg.gate_samples, job.seed)
    if not len(gate_idx) and cfg.int8 != "off":
        raise ExportError(
            f"export: the evaluation split '{job.val.name}' has {len(job.val)} image(s): too few for the bundle's "
            "check images and, apart, the INT8 gate's; give more labelled images, or set export.int8: off"
        )
    if len(check_idx) < cfg.val_samples:
        log.warning(
            "export: the evaluation split '%s' has %d images: %d check images for the bundle (export.val_samples "
            "%d) and %d for the INT8 gate, apart",
            job.val.name,
            len(job.val),
            len(check_idx),
            cfg.val_samples,
            len(gate_idx),
        )
    val_raw = raw_validation_images(job.val, check_idx, b.prep)
    val_labels = job.val.labels[check_idx]
    gate_labels = job.val.labels[gate_idx]
    if job.targets is not None:  # the device compares against target units
        from edgerun.regression import restore

        val_labels = restore(job.targets, val_labels).astype(np.float32)
        gate_labels = restore(job.targets, gate_labels).astype(np.float32)
    val_batches = preprocess(val_raw, b.prep)
    gate_batches = preprocess(raw_validation_images(job.val, gate_idx, b.prep), b.prep)
    both = np.concatenate([val_batches, gate_batches])[: cfg.parity_samples]
    par = parity(job.model, b.onnx_path, both, cfg, classification=job.targets is None)
    log.info(
        "parity: max abs error %.2e, top-1 agreement %.4f on %d images",
        par["max_abs_error"],
        par["top1_agreement"],
        par["samples"],
    )
    np.savez_compressed(b.tmp / VAL_FILE, images=val_raw, labels=val_labels)
    return _HeldOut(check_idx, val_raw, val_labels, val_batches, gate_idx, gate_labels, gate_batches), par


def _int8_variant(
    b: _Build, calib: np.ndarray, held: _HeldOut, fp32_score: float, int8_metrics: dict[str, Any]
) -> dict[str, Any]:
    """The INT8 variant's manifest entry, its figures on the check images (at its own threshold when the gate judged
    the line); the gate's figures are added to ``int8_metrics``, and the variant's threshold to the decision."""
    int8 = _int8(b, calib, held, fp32_score)
    line = int8["quality"].get("line")
    path = b.tmp / "model.int8.onnx"
    on_check = quality(path, *held.check(b), threshold=line["threshold"] if line else None)
    on_check = {k: v for k, v in on_check.items() if k != "score"}
    if line and b.job.decision is not None:
        b.job.decision["thresholds"] = {"fp32": b.job.decision["threshold"], "int8": line["threshold"]}
    int8_metrics.update({k: v for k, v in int8.items() if k not in ("quality",)})
    int8_metrics["int8"] = {
        **on_check,
        "images": "check",
        "gate": {**int8["quality"], "images": "gate: they chose the variant (in-sample for that choice)"},
        "drop": int8["drop"],
        "status": int8["status"],
        "method": int8["chosen"],
    }
    log.info("%s", int8["advice"])
    return {
        "file": "model.int8.onnx",
        "precision": "int8",
        "format": "qdq",
        "symmetric": True,
        "explicit_quantization": True,
        "method": int8["chosen"],
        "calibration": b.job.cfg.int8_method,
        "kept_fp16": int8["kept_fp16"],
        **on_check,
        "drop": int8["drop"],
        "status": int8["status"],
        "for": "tensorrt (every version, no calibrator) and onnxruntime",
    }


def _manifest(
    b: _Build,
    simplified: bool,
    calib: np.ndarray,
    held: _HeldOut,
    variants: dict[str, Any],
    deepstream: Optional[dict],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    import onnxruntime
    import timm

    job, cfg = b.job, b.job.cfg
    return {
        "name": job.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": list(job.classes),
        **({"task": "regression", "targets": dict(job.targets)} if job.targets is not None else {}),
        **({"decision": job.decision} if job.decision is not None else {}),
        "model": {
            "file": MODEL_FILE,
            "input_name": INPUT_NAME,
            "input_shape": list(b.shape),
            "output_name": OUTPUT_NAME,
            "output_shape": [cfg.batch, len(job.classes)],
            "layout": "NCHW",
            "dtype": "float32",
            "opset": b.opset,
            "simplified": bool(simplified),
            "dynamic_batch": ({"min": 1, "opt": cfg.batch, "max": cfg.max_batch} if cfg.dynamic_batch else None),
        },
        "preprocess": b.prep.to_dict(),
        "target": cfg.target,
        "target_facts": b.target,
        "samples": {
            "calib": {
                "file": CALIB_FILE,
                "count": int(len(calib)),
                "split": job.train.name,
                "format": "float32 model input (preprocessed)",
            },
            "val": {
                "file": VAL_FILE,
                "count": int(len(held.raw)),
                "split": job.val.name,
                "chose": "nothing (apart from the INT8 gate's images and every threshold's)",
                "gate_images": int(len(held.gate_indices)),
                "format": "raw uint8 RGB images + "
                + ("float targets in target units" if job.targets is not None else "int64 labels"),
            },
        },
        "variants": variants,
        **({"deepstream": deepstream["files"]} if deepstream else {}),
        "metrics": metrics,
        "source": dict(job.source, checkpoint_sha256=sha256_file(str(job.checkpoint))),
        "versions": {
            "edgedistill": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def build_bundle(job: ExportJob) -> dict:
    """Write a verified bundle folder at ``job.out_dir`` and return its manifest dictionary (see :class:`ExportJob`)."""
    cfg = job.cfg
    target, opset = _target_and_opset(cfg)
    prep = eval_spec(job.data_cfg)
    size = job.data_cfg.image_size
    tmp = job.out_dir.with_name(f".{job.out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    b = _Build(
        job=job,
        tmp=tmp,
        target=target,
        opset=opset,
        shape=(cfg.batch, 3, size, size),
        prep=prep,
        onnx_path=tmp / MODEL_FILE,
    )
    try:
        (tmp / "recipe.yaml").write_text(job.recipe_yaml)
        simplified = _export_checked(b)
        held, par = _held_out(b)
        calib_idx = _pick(len(job.train), cfg.calib_samples, job.seed + 1)  # calibration from train only
        # the files as they decode, through the device's own preprocessing (not the training form, shrunk for
        # augmentation): INT8 ranges are calibrated on the pixels the engine will see
        calib = preprocess([job.train.original(int(i)) for i in calib_idx], b.prep)
        np.save(tmp / CALIB_FILE, calib)

        decision = job.decision
        if decision is not None:
            decision = dict(decision)
            if decision.get("positive_class") is not None:
                decision["positive_index"] = list(job.classes).index(decision["positive_class"])
        job = replace(job, decision=decision)
        b.job = job
        fp32 = quality(b.onnx_path, *held.check(b))
        variants: dict[str, Any] = {}
        int8_metrics: dict[str, Any] = {f"fp32_{k}": v for k, v in fp32.items() if k != "score"}
        if cfg.int8 != "off":
            gate_fp32 = quality(b.onnx_path, *held.gate(b))
            int8_metrics["fp32_gate"] = {k: v for k, v in gate_fp32.items() if k != "score"}
            variants["int8"] = _int8_variant(b, calib, held, gate_fp32["score"], int8_metrics)
        deepstream = None
        if cfg.deepstream and job.targets is None:
            deepstream = _deepstream(b, variants.get("int8"), held.indices, job.decision)
        if job.teacher is not None:
            export_onnx(job.teacher, tmp / "teacher.onnx", b.shape, opset, cfg.dynamic_batch)
            check_operators(onnx.load(str(tmp / "teacher.onnx")), target, opset)
            variants["teacher"] = {"file": "teacher.onnx", "precision": "fp32", "for": "comparison"}
        metrics = {
            "host": job.host_metrics,
            "parity": par,
            "int8": int8_metrics,
            **({"deepstream": deepstream["host"]} if deepstream else {}),
        }
        written = write_manifest(str(tmp), _manifest(b, simplified, calib, held, variants, deepstream, metrics))
        if job.out_dir.exists():
            shutil.rmtree(job.out_dir)
        tmp.rename(job.out_dir)
        return written.data
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
