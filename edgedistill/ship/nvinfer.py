"""How DeepStream's nvinfer (Gst-nvinfer) feeds a network, and the host's measurement of the student under it.

nvinfer feeds a network differently from edgerun and from training:

- it scales the whole frame (or object) to the network's size, with no centre crop (``maintain-aspect-ratio=0``
  stretches; ``=1`` pads), and
- it normalizes with ONE factor for every channel: ``y = net-scale-factor * (x - offsets[c])``.

A student evaluated with timm's resize-and-crop and a per-channel std would silently lose accuracy there, so
the export writes the parameters that reproduce the recipe's normalization exactly when its std is uniform,
``export.input: uint8`` folds the normalization into the DeepStream model (raw pixel values in, scale 1,
offsets 0: exact for any std), and :func:`host_accuracy` measures on the host the student's top-1 under
DeepStream's preprocessing next to the bundle's own, so the difference is a figure, not a surprise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgedistill.errors import ExportError
from edgerun.preprocess import INTERPOLATIONS, PreprocessSpec, preprocess, to_three_channels

PROBS = "probabilities"  # the DeepStream model's output: the student's logits through a Softmax

# The recipe's interpolation -> (the filter nvinfer's GPU scaler applies, its NvBufSurfTransform_Inter value for
# scaling-filter). NvBufSurfTransform has no area filter: an `area` recipe is scaled bilinearly there, and the host
# measurement uses that same filter, not OpenCV's INTER_AREA (which the line would never see).
SCALER = {"nearest": ("nearest", 0), "bilinear": ("bilinear", 1), "bicubic": ("bicubic", 2), "area": ("bilinear", 1)}


def parameters(spec: PreprocessSpec, folded: bool) -> dict[str, Any]:
    """nvinfer's net-scale-factor and offsets for ``spec``: exact when the std is one value for all channels or the
    normalization is folded into the model (``export.input: uint8``), else the closest single factor (the mean
    of the stds), flagged ``exact: False``."""
    if folded:
        return {
            "net_scale_factor": 1.0,
            "offsets": [0.0, 0.0, 0.0],
            "exact": True,
            "note": "normalization folded into the model (export.input: uint8): raw pixel values in",
        }
    std = np.asarray(spec.std, dtype=np.float64)
    uniform = bool(np.allclose(std, std[0], rtol=1e-6, atol=0))
    scale = spec.scale / (std[0] if uniform else float(std.mean()))
    out = {"net_scale_factor": float(scale), "offsets": [float(m / spec.scale) for m in spec.mean], "exact": uniform}
    out["note"] = (
        "exact: the recipe's std is the same for every channel"
        if uniform
        else f"APPROXIMATE: nvinfer has one scale for all channels and the recipe's std is per channel "
        f"({', '.join(f'{s:g}' for s in spec.std)}); the mean std is used. `export.input: uint8` "
        f"folds the exact normalization into the DeepStream model"
    )
    return out


def deepstream_model(
    onnx_path: Path, out_path: Path, spec: PreprocessSpec, folded: bool, input_name: str, output_name: str
) -> None:
    """The bundle's ONNX model with a Softmax after its logits (nvinfer's classifier compares probabilities with
    classifier-threshold) and, when ``folded``, the normalization in front: ``x * scale/std - mean/std``."""
    model = onnx.load(str(onnx_path))
    graph = model.graph
    if [o.name for o in graph.output] != [output_name] or [i.name for i in graph.input if i.name == input_name] != [
        input_name
    ]:
        raise ExportError(
            f"{onnx_path}: expected input '{input_name}' and one output '{output_name}' to build the DeepStream model"
        )
    graph.node.append(helper.make_node("Softmax", [output_name], [PROBS], axis=1, name="deepstream_softmax"))
    old_out = graph.output[0]
    dims = [d for d in old_out.type.tensor_type.shape.dim]
    graph.output.pop()
    graph.output.append(
        helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, [d.dim_value or d.dim_param for d in dims])
    )
    if folded:
        pixels = "pixels"
        for inp in graph.input:
            if inp.name == input_name:
                inp.name = pixels
        gain = (spec.scale / np.asarray(spec.std, np.float32)).reshape(1, 3, 1, 1).astype(np.float32)
        bias = (-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).reshape(1, 3, 1, 1)
        graph.initializer.extend(
            [
                numpy_helper.from_array(gain, "deepstream_gain"),
                numpy_helper.from_array(bias.astype(np.float32), "deepstream_bias"),
            ]
        )
        scaled = "deepstream_scaled"
        graph.node.insert(
            0, helper.make_node("Add", [scaled, "deepstream_bias"], [input_name], name="deepstream_offset")
        )
        graph.node.insert(0, helper.make_node("Mul", [pixels, "deepstream_gain"], [scaled], name="deepstream_scale"))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def ds_preprocess(
    images: Sequence[np.ndarray], size: tuple[int, int], params: dict[str, Any], interpolation: str, channel_order: str
) -> np.ndarray:
    """What nvinfer hands the network (maintain-aspect-ratio=0): the whole image scaled to (height, width), then
    ``net-scale-factor * (x - offsets)`` per channel, NCHW float32, scaled with the filter nvinfer applies for the
    recipe's ``interpolation`` (``SCALER``: bilinear for ``area``). OpenCV's filter stands in for the GPU's (close,
    not bit-exact)."""
    h, w = size
    applied = SCALER[interpolation][0]
    out = []
    for image in images:
        rgb = to_three_channels(np.asarray(image))
        if channel_order == "BGR":
            rgb = rgb[..., ::-1]
        resized = rgb if rgb.shape[:2] == (h, w) else cv2.resize(rgb, (w, h), interpolation=INTERPOLATIONS[applied])
        out.append(resized)
    batch = np.stack(out).astype(np.float32)
    batch = (batch - np.asarray(params["offsets"], np.float32)) * np.float32(params["net_scale_factor"])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def host_accuracy(
    bundle_model: Path,
    ds_model: Path,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    spec: PreprocessSpec,
    params: dict[str, Any],
    model_batch: int,
    dynamic: bool,
) -> dict[str, Any]:
    """Top-1 of the same images through the bundle's preprocessing (resize, centre crop, per-channel
    normalization) and through DeepStream's (whole-image resize, one scale: ``params``' net_scale_factor and
    offsets), on the host with ONNX Runtime."""
    from edgedistill.ship.onnx import ort_outputs

    ours = ort_outputs(bundle_model, preprocess(list(images), spec), model_batch, dynamic)
    theirs = ort_outputs(
        ds_model, ds_preprocess(images, spec.crop, params, spec.interpolation, spec.channel_order), model_batch, dynamic
    )
    labels = np.asarray(labels)
    bundle_top1 = float((ours.argmax(1) == labels).mean())
    ds_top1 = float((theirs.argmax(1) == labels).mean())
    return {
        "bundle_top1": bundle_top1,
        "deepstream_top1": ds_top1,
        "difference": ds_top1 - bundle_top1,
        "agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
        "images": int(len(labels)),
        "how": "host, ONNX Runtime: the whole image resized to the network size (OpenCV "
        f"{SCALER[spec.interpolation][0]}, standing in for nvinfer's GPU scaler"
        + (f", which has no {spec.interpolation} filter" if SCALER[spec.interpolation][0] != spec.interpolation else "")
        + "), y = net-scale-factor * (x - offsets)",
    }
