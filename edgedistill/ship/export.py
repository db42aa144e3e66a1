"""Export a trained student to a device bundle: ONNX with a parity proof, samples, host INT8, manifest.

The bundle is assembled in a temporary folder and renamed into place only when every check passed, so a
failed export (an operator the target cannot take, parity above tolerance) writes nothing.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional
import numpy as np
import onnx
import torch
from torch import nn
from edgerun.bundle.manifest import sha256_file, write_manifest
from edgerun.preprocess import PreprocessSpec, center_crop, preprocess, resize_shorter_side
from edgerun.profiles import get_target
from edgedistill import __version__
from edgedistill.data.splits import Split
from edgedistill.data.images import eval_spec
from edgedistill.errors import RecipeError
from edgedistill.recipe.sections import ExportConfig
from edgedistill.ship.onnx import INPUT_NAME, OUTPUT_NAME, check_operators, export_onnx, ort_outputs, parity, simplify

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
    return np.stack([center_crop(resize_shorter_side(im if im.ndim == 3 else im[:, :, None], side, spec.interpolation),
                                 (side, side)) for im in images])

def _pick(n_total: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))

def quality(path: Path, batches: np.ndarray, labels: np.ndarray, cfg: ExportConfig,
            targets: Optional[dict] = None, decision: Optional[dict] = None) -> dict[str, float]:
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

def _int8(onnx_path: Path, folder: Path, calib: np.ndarray, held_out: tuple, cfg: ExportConfig, fp32_score: float,
          shape: tuple, opset: int, target: dict, qad) -> dict[str, Any]:
    """The bundle's INT8 model (``quantize.build_int8``): PTQ, partial, QAD as ``export.int8`` asks."""
    from edgedistill.ship.int8 import Int8Job, build_int8

    batch = cfg.batch if not cfg.dynamic_batch else 1

    def export_float(model: nn.Module, path: Path) -> Path:
        export_onnx(model, path, shape, opset, cfg.dynamic_batch)
        if cfg.simplify:
            simplify(path)
        check_operators(onnx.load(str(path)), target, opset)
        return path

    job = Int8Job(fp32_path=onnx_path, workdir=folder, calib=calib, calib_batch=batch,
                  score=lambda path: quality(path, *held_out), run_calib=lambda path: ort_outputs(
                      path, calib[:cfg.int8_sensitivity_images], cfg.batch, cfg.dynamic_batch),
                  fp32_score=fp32_score, mode=cfg.int8, method=cfg.int8_method, limit=cfg.int8_max_drop,
                  budget=cfg.int8_keep_budget, sensitivity_images=cfg.int8_sensitivity_images,
                  regression=held_out[3] is not None, qad=qad,
                  export_float=export_float)
    return build_int8(job)

def _deepstream(folder: Path, onnx_path: Path, int8: Optional[dict], val: Split, indices: np.ndarray,
                labels: np.ndarray, spec: PreprocessSpec, shape: tuple, classes: list[str], cfg: ExportConfig,
                decision: Optional[dict], name: str) -> dict[str, Any]:
    """The bundle's deepstream/ (``deepstream.write``) and the host top-1 under DeepStream's preprocessing, measured
    on the validation images as they decode (a camera frame is not centre-cropped by nvinfer either)."""
    from edgedistill.ship import deepstream

    int8_file = folder / int8["file"] if int8 and int8.get("status") == "accepted" else None
    files = deepstream.write(folder / deepstream.FOLDER, bundle_model=onnx_path,
                             manifest_model={"input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                                             "input_shape": list(shape)},
                             classes=classes, spec=spec, folded=cfg.input == "uint8", batch=cfg.batch,
                             int8_file=int8_file, decision=decision, source=cfg.deepstream_source,
                             camera=cfg.deepstream_camera, name=name)
    host = deepstream.host_accuracy(onnx_path, folder / deepstream.FOLDER / deepstream.MODEL,
                                    [val.original(int(i)) for i in indices], labels, spec, files, cfg.batch,
                                    cfg.dynamic_batch)
    host.update(exact_normalization=files["exact_normalization"], input=files["input"])
    log.info("DeepStream preprocessing on the host: top-1 %.2f%% against the bundle's %.2f%% (%+.2f points, %s)",
             host["deepstream_top1"] * 100, host["bundle_top1"] * 100, host["difference"] * 100, files["note"])
    return {"files": files, "host": host}

def build_bundle(*, model: nn.Module, out_dir: Path, name: str, classes: list[str], train: Split, val: Split,
                 data_cfg, cfg: ExportConfig, seed: int, checkpoint: Path, source: dict[str, Any],
                 host_metrics: dict[str, Any], recipe_yaml: str, teacher: Optional[nn.Module] = None,
                 targets: Optional[dict] = None, decision: Optional[dict] = None,
                 qad: Optional[Callable[[dict[str, float]], tuple[nn.Module, dict[str, Any]]]] = None) -> dict:
    """Write a verified bundle folder at ``out_dir`` and return its manifest dictionary. ``targets`` (regression:
    {names, mean, std}) makes a regression bundle: val.npz holds target values in target units, the manifest
    carries the scaling, INT8 is judged by its R² drop. ``decision`` ({metric, positive_class, threshold, ...}:
    the evaluate stage's operating point) goes into the manifest for the device's reject decision, with the
    recall and false-reject rate of FP32 and the INT8 model on the bundle's own validation images. ``qad`` trains
    the fake-quantized student when ``export.int8`` reaches quantization-aware distillation (``quantize.py``)."""
    target = get_target(cfg.target)
    opset = cfg.opset or target["max_opset"]
    if opset > target["max_opset"]:
        raise RecipeError(f"export.opset {opset} is above what target {cfg.target} takes (at most "
                          f"{target['max_opset']}, TensorRT {target.get('tensorrt')})")
    if cfg.dynamic_batch and not (cfg.batch <= cfg.max_batch):
        raise RecipeError("export.batch (the optimal batch) must be at most export.max_batch")
    spec = eval_spec(data_cfg)
    size = data_cfg.image_size
    shape = (cfg.batch, 3, size, size)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        onnx_path = tmp / MODEL_FILE
        export_onnx(model, onnx_path, shape, opset, cfg.dynamic_batch)
        proto = onnx.load(str(onnx_path))
        onnx.checker.check_model(proto)
        check_operators(proto, target, opset)
        simplified = cfg.simplify and simplify(onnx_path)
        if simplified:
            proto = onnx.load(str(onnx_path))
            onnx.checker.check_model(proto)
            check_operators(proto, target, opset)

        # held-out images for parity and the device's own accuracy check; calibration from train only
        val_idx = _pick(len(val), max(cfg.val_samples, cfg.parity_samples), seed)
        val_raw = raw_validation_images(val, val_idx, spec)
        val_labels = val.labels[val_idx]
        if targets is not None:  # the device compares against target units
            from edgerun.regression import restore

            val_labels = restore(targets, val_labels).astype(np.float32)
        val_batches = preprocess(val_raw, spec)
        par = parity(model, onnx_path, val_batches[:cfg.parity_samples], cfg, classification=targets is None)
        log.info("parity: max abs error %.2e, top-1 agreement %.4f on %d images", par["max_abs_error"],
                 par["top1_agreement"], par["samples"])
        np.savez_compressed(tmp / VAL_FILE, images=val_raw[:cfg.val_samples], labels=val_labels[:cfg.val_samples])
        calib_idx = _pick(len(train), cfg.calib_samples, seed + 1)
        calib = preprocess([train.load(int(i)) for i in calib_idx], spec)
        np.save(tmp / CALIB_FILE, calib)

        if decision is not None:
            decision = dict(decision)
            if decision.get("positive_class") is not None:
                decision["positive_index"] = list(classes).index(decision["positive_class"])
        held_out = (val_batches[:cfg.val_samples], val_labels[:cfg.val_samples], cfg, targets, decision)
        fp32 = quality(onnx_path, *held_out)
        fp32_score = fp32["score"]
        variants: dict[str, Any] = {}
        int8_metrics: dict[str, Any] = {f"fp32_{k}": v for k, v in fp32.items() if k != "score"}
        if cfg.int8 != "off":
            int8 = _int8(onnx_path, tmp, calib, held_out, cfg, fp32_score, shape, opset, target, qad)
            int8_metrics.update({k: v for k, v in int8.items() if k not in ("quality",)})
            int8_metrics["int8"] = {**int8["quality"], "drop": int8["drop"], "status": int8["status"],
                                    "method": int8["chosen"]}
            variants["int8"] = {"file": "model.int8.onnx", "precision": "int8", "format": "qdq", "symmetric": True,
                                "explicit_quantization": True, "method": int8["chosen"], "calibration": cfg.int8_method,
                                "kept_fp16": int8["kept_fp16"], **int8["quality"], "drop": int8["drop"],
                                "status": int8["status"], "for": "tensorrt (every version, no calibrator) and onnxruntime"}
            log.info("%s", int8["advice"])
        deepstream = None
        if cfg.deepstream and targets is None:
            deepstream = _deepstream(tmp, onnx_path, variants.get("int8"), val, val_idx[:cfg.val_samples],
                                     val.labels[val_idx[:cfg.val_samples]], spec, shape, classes, cfg, decision, name)
        if teacher is not None:
            export_onnx(teacher, tmp / "teacher.onnx", shape, opset, cfg.dynamic_batch)
            check_operators(onnx.load(str(tmp / "teacher.onnx")), target, opset)
            variants["teacher"] = {"file": "teacher.onnx", "precision": "fp32", "for": "comparison"}

        import onnxruntime
        import timm

        manifest = {
            "name": name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": list(classes),
            **({"task": "regression", "targets": dict(targets)} if targets is not None else {}),
            **({"decision": decision} if decision is not None else {}),
            "model": {"file": MODEL_FILE, "input_name": INPUT_NAME, "input_shape": list(shape),
                      "output_name": OUTPUT_NAME, "output_shape": [cfg.batch, len(classes)], "layout": "NCHW",
                      "dtype": "float32", "opset": opset, "simplified": bool(simplified),
                      "dynamic_batch": ({"min": 1, "opt": cfg.batch, "max": cfg.max_batch}
                                        if cfg.dynamic_batch else None)},
            "preprocess": spec.to_dict(),
            "target": cfg.target,
            "target_facts": target,
            "samples": {"calib": {"file": CALIB_FILE, "count": int(len(calib)), "split": train.name,
                                  "format": "float32 model input (preprocessed)"},
                        "val": {"file": VAL_FILE, "count": int(min(cfg.val_samples, len(val_raw))),
                                "split": val.name, "format": "raw uint8 RGB images + " + (
                                    "float targets in target units" if targets is not None else "int64 labels")}},
            "variants": variants,
            **({"deepstream": deepstream["files"]} if deepstream else {}),
            "metrics": {"host": host_metrics, "parity": par, "int8": int8_metrics,
                        **({"deepstream": deepstream["host"]} if deepstream else {})},
            "source": dict(source, checkpoint_sha256=sha256_file(str(checkpoint))),
            "versions": {"edgedistill": __version__, "torch": torch.__version__, "timm": timm.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        written = write_manifest(str(tmp), manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return written.data
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
