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
from edgedistill.errors import RecipeError
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
) -> dict[str, float]:
    """The ONNX model's quality on held-out images: ``top1`` (and, with a ``decision`` threshold, the recall and
    false-reject rate of its positive class there); or, with regression ``targets`` (labels in target units),
    ``r2`` and ``mae``. ``score`` is the one compared across variants."""
    outputs = ort_outputs(path, batches, cfg.batch, cfg.dynamic_batch)
    if targets is None:
        top1 = float((outputs.argmax(1) == labels).mean())
        out = {"top1": top1, "score": top1}
        if decision and decision.get("threshold") is not None:
            from edgerun.decision import positive_scores, rates_at

            index = decision["positive_index"]
            rates = rates_at(np.asarray(labels) == index, positive_scores(outputs, index), decision["threshold"])
            out.update(recall=rates["recall"], false_reject=rates["false_reject"])
        return out
    from edgerun.regression import restore, summarize

    got = summarize(restore(targets, outputs), np.asarray(labels, dtype=np.float64), targets["names"])
    return {"r2": got["r2"], "mae": got["mae"], "score": got["r2"]}


@dataclass
class ExportJob:
    """What ``build_bundle`` ships: the trained ``model`` into the folder ``out_dir`` under ``name``, its classes, the
    training split (calibration images) and the validation split (parity, the device's own check), the recipe's data
    and export sections, the seed, the checkpoint it came from, its source facts and the host's metrics.

    ``targets`` (regression: {names, mean, std}) makes a regression bundle: val.npz holds target values in target
    units, the manifest carries the scaling, INT8 is judged by its R² drop. ``decision`` ({metric, positive_class,
    threshold, ...}: the evaluate stage's operating point) goes into the manifest for the device's reject decision,
    with the recall and false-reject rate of FP32 and the INT8 model on the bundle's own validation images. ``qad``
    trains the fake-quantized student when ``export.int8`` reaches quantization-aware distillation (``ship.int8``);
    ``teacher`` ships the teacher as ``teacher.onnx`` for comparison."""

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
    """The validation images the bundle carries (raw, with their labels or targets) and their preprocessed batches:
    the parity proof, the quality of every variant and the device's own check."""

    indices: np.ndarray
    raw: np.ndarray
    labels: np.ndarray
    batches: np.ndarray


def _int8(b: _Build, calib: np.ndarray, held_out: tuple, fp32_score: float) -> dict[str, Any]:
    """The bundle's INT8 model (``ship.int8.build_int8``): PTQ, partial, QAD as ``export.int8`` asks."""
    from edgedistill.ship.int8 import Int8Job, build_int8

    cfg = b.job.cfg
    batch = cfg.batch if not cfg.dynamic_batch else 1

    def export_float(model: nn.Module, path: Path) -> Path:
        export_onnx(model, path, b.shape, b.opset, cfg.dynamic_batch)
        if cfg.simplify:
            simplify(path)
        check_operators(onnx.load(str(path)), b.target, b.opset)
        return path

    job = Int8Job(
        fp32_path=b.onnx_path,
        workdir=b.tmp,
        calib=calib,
        calib_batch=batch,
        score=lambda path: quality(path, *held_out),
        run_calib=lambda path: ort_outputs(path, calib[: cfg.int8_sensitivity_images], cfg.batch, cfg.dynamic_batch),
        fp32_score=fp32_score,
        mode=cfg.int8,
        method=cfg.int8_method,
        limit=cfg.int8_max_drop,
        budget=cfg.int8_keep_budget,
        sensitivity_images=cfg.int8_sensitivity_images,
        regression=held_out[3] is not None,
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
    """Held-out images for parity and the device's own accuracy check (written to val.npz), and the parity of the
    ONNX model with PyTorch on them."""
    job, cfg = b.job, b.job.cfg
    val_idx = _pick(len(job.val), max(cfg.val_samples, cfg.parity_samples), job.seed)
    val_raw = raw_validation_images(job.val, val_idx, b.prep)
    val_labels = job.val.labels[val_idx]
    if job.targets is not None:  # the device compares against target units
        from edgerun.regression import restore

        val_labels = restore(job.targets, val_labels).astype(np.float32)
    val_batches = preprocess(val_raw, b.prep)
    par = parity(job.model, b.onnx_path, val_batches[: cfg.parity_samples], cfg, classification=job.targets is None)
    log.info(
        "parity: max abs error %.2e, top-1 agreement %.4f on %d images",
        par["max_abs_error"],
        par["top1_agreement"],
        par["samples"],
    )
    np.savez_compressed(b.tmp / VAL_FILE, images=val_raw[: cfg.val_samples], labels=val_labels[: cfg.val_samples])
    return _HeldOut(val_idx, val_raw, val_labels, val_batches), par


def _int8_variant(
    b: _Build, calib: np.ndarray, held_out: tuple, fp32_score: float, int8_metrics: dict[str, Any]
) -> dict[str, Any]:
    """The INT8 variant's manifest entry; its figures and the gate's are added to ``int8_metrics``."""
    int8 = _int8(b, calib, held_out, fp32_score)
    int8_metrics.update({k: v for k, v in int8.items() if k not in ("quality",)})
    int8_metrics["int8"] = {**int8["quality"], "drop": int8["drop"], "status": int8["status"], "method": int8["chosen"]}
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
        **int8["quality"],
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
                "count": int(min(cfg.val_samples, len(held.raw))),
                "split": job.val.name,
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
        held_out = (held.batches[: cfg.val_samples], held.labels[: cfg.val_samples], cfg, job.targets, decision)
        fp32 = quality(b.onnx_path, *held_out)
        variants: dict[str, Any] = {}
        int8_metrics: dict[str, Any] = {f"fp32_{k}": v for k, v in fp32.items() if k != "score"}
        if cfg.int8 != "off":
            variants["int8"] = _int8_variant(b, calib, held_out, fp32["score"], int8_metrics)
        deepstream = None
        if cfg.deepstream and job.targets is None:
            deepstream = _deepstream(b, variants.get("int8"), held.indices[: cfg.val_samples], decision)
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
