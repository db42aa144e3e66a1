"""DeepStream's own files for a bundle: the nvinfer configs, labels and deepstream-app configs per release, every
key checked against that release's parser. How nvinfer feeds the network, the DeepStream model and the host's
measurement of the student under that preprocessing are ``ship.nvinfer``.

Keys: the ``[property]`` keys of ``gstnvinfer_property_parser.h`` (DeepStream 6.0's header, 2018-2021; the 6.4,
7.0 and 8.0 API references add the memory and dump keys listed in ``NVINFER_KEYS_7``) and the deepstream-app
groups of NVIDIA's "DeepStream Reference Application - deepstream-app" configuration guide. Enumerations:
network-mode 0 FP32, 1 INT8, 2 FP16; network-type 1 classifier; process-mode 1 primary; model-color-format
0 RGB, 1 BGR; scaling-filter is NvBufSurfTransform_Inter (0 nearest, 1 bilinear, 2 Algo1 = cubic on the GPU);
scaling-compute-hw 1 GPU (the VIC's filters differ from the GPU's and from OpenCV's).
"""

from __future__ import annotations

import configparser
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from edgedistill.errors import ExportError
from edgedistill.recipe.outputs import check_deepstream_source
from edgedistill.ship.nvinfer import PROBS, SCALER, deepstream_model, parameters
from edgerun.decision import threshold_for
from edgerun.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

FOLDER = "deepstream"
MODEL = "model.onnx"
LABELS = "labels.txt"
INFER_CONFIG = "config_infer_primary.txt"
APP_CONFIG = "deepstream_app_config.txt"
LIVE = ("csi://", "usb://", "/dev/video", "rtsp://", "rtsps://")  # cameras, not files

# Gst-nvinfer's [property] keys, from gstnvinfer_property_parser.h of each release (group names excluded)
NVINFER_KEYS_6_0 = frozenset(
    """
parse-func gie-unique-id process-mode interval labelfile-path gpu-id secondary-reinfer-interval output-tensor-meta
enable-dla use-dla-core batch-size tensor-meta-pool-size network-mode model-engine-file int8-calib-file
workspace-size output-blob-names is-classifier network-type force-implicit-batch-dim infer-dims output-io-formats
layer-device-precision model-color-format net-scale-factor offsets mean-file maintain-aspect-ratio
symmetric-padding scaling-filter scaling-compute-hw network-input-order input-tensor-from-meta custom-lib-path
parse-bbox-func-name parse-bbox-instance-mask-func-name engine-create-func-name parse-classifier-func-name
custom-network-config model-file proto-file uff-file uff-input-order input-dims uff-input-dims uff-input-blob-name
tlt-encoded-model tlt-model-key onnx-file num-detected-classes enable-dbscan cluster-mode classifier-type
classifier-threshold classifier-async-mode segmentation-threshold segmentation-output-order output-instance-mask
input-object-min-width input-object-min-height input-object-max-width input-object-max-height operate-on-gie-id
operate-on-class-ids filter-out-class-ids
""".split()
)
NVINFER_KEYS_7 = NVINFER_KEYS_6_0 | frozenset(
    "disable-output-host-copy auto-inc-mem max-gpu-mem-per dump-input-tensor dump-output-tensor".split()
)

# deepstream-app groups and the keys this writer uses in each (the reference application's configuration guide)
APP_KEYS = {
    "application": {"enable-perf-measurement", "perf-measurement-interval-sec"},
    "tiled-display": {"enable", "rows", "columns", "width", "height", "gpu-id", "nvbuf-memory-type"},
    "source0": {
        "enable",
        "type",
        "camera-width",
        "camera-height",
        "camera-fps-n",
        "camera-fps-d",
        "camera-csi-sensor-id",
        "camera-v4l2-dev-node",
        "uri",
        "num-sources",
        "gpu-id",
        "nvbuf-memory-type",
        "latency",
        "file-loop",
    },
    "streammux": {
        "gpu-id",
        "live-source",
        "batch-size",
        "batched-push-timeout",
        "width",
        "height",
        "enable-padding",
        "nvbuf-memory-type",
    },
    "primary-gie": {
        "enable",
        "gpu-id",
        "batch-size",
        "gie-unique-id",
        "nvbuf-memory-type",
        "config-file",
        "model-engine-file",
    },
    "osd": {
        "enable",
        "gpu-id",
        "border-width",
        "text-size",
        "text-color",
        "text-bg-color",
        "font",
        "show-clock",
        "nvbuf-memory-type",
    },
    "sink0": {"enable", "type", "sync", "source-id", "gpu-id", "nvbuf-memory-type"},
}
VERSIONS = {  # folder -> (DeepStream, JetPack, nvinfer keys)
    "ds6.0": ("6.0 / 6.0.1", "4.6 / 4.6.1+", NVINFER_KEYS_6_0),  # 6.0 on R32.6.1, 6.0.1 on R32.7; same keys
    "ds7": ("7.x", "6", NVINFER_KEYS_7),
}
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}

# Why the bundle's deepstream/ has no INT8 config even when its INT8 model passed the gate. The INT8 model is
# explicit quantization (Q/DQ nodes); nvinfer (nvdsinfer_model_builder.cpp, DeepStream 6.0 ... 7.x) builds INT8
# only with an int8-calib-file and, given network-mode=1 without one, falls back to FP16 and names the engine
# `<model>_b<N>_gpu0_fp16.engine`: an INT8 config would never find the engine it names and would rebuild FP16 at
# every start. A calibration cache translated from the Q/DQ scales onto a Q/DQ-free model (NVIDIA's
# qdq-translator) leaves tensors without a scale to TensorRT's fallback, and nothing of it could be checked here
# without a board. So INT8 on the line runs through edgerun, whose engine is the gated one.
NO_INT8 = (
    "no INT8 nvinfer config: the accepted INT8 model is explicit Q/DQ, and nvinfer builds INT8 only with an "
    "int8-calib-file (without one it builds FP16 under another engine name, at every start). Run INT8 with "
    "`edgerun build --precision int8` and `edgerun camera`; DeepStream runs the FP16 config"
)
# nvinfer's classifier-threshold only drops labels under it; it cannot reject a part on one class's probability.
REJECT_NOTE = (
    "the reject decision is the application's: nvinfer attaches the top class; read the probabilities from the "
    "output tensor meta (output-tensor-meta=1) in a pad probe and reject at the bundle's threshold"
)
COLOR_FORMAT = {"RGB": 0, "BGR": 1}


def _ini(groups: dict[str, dict[str, Any]], header: Sequence[str]) -> str:
    """GLib key-file text; every line checked: a line break in a value, comment or header line would start a new
    key or group (a class name or camera URL injecting a second model-engine-file)."""
    lines = [f"# {line}" if line else "#" for line in header]
    for group, keys in groups.items():
        lines += ["", f"[{group}]"]
        for key, value in keys.items():
            if isinstance(value, tuple):  # (value, comment)
                value, comment = value
                lines.append(f"# {comment}")
            if isinstance(value, (list, tuple)):
                value = ";".join(_num(v) for v in value)
            lines.append(f"{key}={_num(value)}")
    for line in lines:
        if _control(line):
            raise ExportError(
                f"DeepStream config line {line!r} holds a line break or control character, which would inject keys "
                "into the config: remove it from the class names, export.deepstream_source or the bundle name"
            )
    return "\n".join(lines) + "\n"


def _control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def source_group(source: str, camera: tuple[int, int, int]) -> dict[str, Any]:
    """deepstream-app [source0] for an edgerun-style source: csi://N, usb://N or /dev/videoN, rtsp://..., a
    file (type 1 V4L2 camera, 2 URI, 4 RTSP, 5 CSI camera on Jetson)."""
    width, height, fps = camera
    try:
        check_deepstream_source(source)
    except ValueError as exc:
        raise ExportError(f"export.deepstream_source {exc}") from None
    common = {"enable": 1}
    cam = {"camera-width": width, "camera-height": height, "camera-fps-n": fps, "camera-fps-d": 1}
    if source.startswith("csi://"):
        sensor = int(source[6:] or 0)
        return {**common, "type": (5, "5 = CSI camera (Jetson)"), "camera-csi-sensor-id": sensor, **cam}
    if source.startswith(("usb://", "/dev/video")):
        node = int((source[6:] if source.startswith("usb://") else source[len("/dev/video") :]) or 0)
        return {**common, "type": (1, "1 = V4L2 (USB) camera"), "camera-v4l2-dev-node": node, **cam}
    if source.startswith(("rtsp://", "rtsps://")):
        return {**common, "type": (4, "4 = RTSP"), "uri": source, "latency": 100}
    if source.startswith(("http://", "https://", "file://")):
        return {**common, "type": (2, "2 = URI"), "uri": source}
    return {**common, "type": (2, "2 = URI (a file)"), "uri": "file://" + source, "file-loop": 0}


def parse_camera(text: str) -> tuple[int, int, int]:
    """'1280x720@30' -> (1280, 720, 30)."""
    try:
        size, _, fps = text.partition("@")
        width, height = (int(v) for v in size.lower().split("x"))
        rate = int(fps or 30)
    except ValueError:
        raise ExportError(f"export.deepstream_camera '{text}': expected WIDTHxHEIGHT@FPS, e.g. 1280x720@30") from None
    if min(width, height, rate) <= 0:
        raise ExportError(f"export.deepstream_camera '{text}': width, height and FPS must be positive")
    return width, height, rate


@dataclass
class DeepStreamJob:
    """What ``write`` writes into ``folder`` (the bundle's deepstream/): the bundle's model and its names and input
    shape (``manifest_model``), the classes, the evaluation preprocessing (``spec``) and whether the normalization is
    folded into the model (``export.input: uint8``), the batch, the accepted INT8 model if any, the reject decision,
    the camera source and its ``WIDTHxHEIGHT@FPS``, the bundle's name."""

    folder: Path
    bundle_model: Path
    manifest_model: dict[str, Any]
    classes: Sequence[str]
    spec: PreprocessSpec
    folded: bool
    batch: int
    int8_file: Optional[Path]
    decision: Optional[dict]
    source: str
    camera: str
    name: str


def _infer_config(
    job: DeepStreamJob, precision: str, model_file: str, params: dict[str, Any], ds_version: str, keys: frozenset
) -> dict[str, Any]:
    """nvinfer's [property] group for one precision of the model, refused when a key is not the release's."""
    _, _, height, width = job.manifest_model["input_shape"]
    spec, decision = job.spec, job.decision
    threshold = threshold_for(decision or {}, precision)  # the INT8 model's own, picked on the same images
    infer = {
        "gpu-id": 0,
        "gie-unique-id": 1,
        "process-mode": (1, "1 = primary: the whole frame"),
        "network-type": (1, "1 = classifier"),
        "onnx-file": f"../{model_file}",
        "model-engine-file": (
            f"../{model_file}_b{job.batch}_gpu0_{precision}.engine",
            "the name nvinfer gives the engine it builds on first start; reused after",
        ),
        "labelfile-path": f"../{LABELS}",
        "batch-size": job.batch,
        "network-mode": (NETWORK_MODE[precision], "0 = FP32, 1 = INT8, 2 = FP16"),
        "infer-dims": [3, height, width],
        "network-input-order": (0, "0 = NCHW"),
        "model-color-format": (COLOR_FORMAT[spec.channel_order], "0 = RGB, 1 = BGR"),
        "net-scale-factor": (params["net_scale_factor"], "y = net-scale-factor * (x - offsets): " + params["note"]),
        "offsets": params["offsets"],
        "maintain-aspect-ratio": (
            0,
            "0 = the whole frame scaled to the network size (no centre crop): the "
            "host top-1 under this preprocessing is in the manifest",
        ),
        "scaling-filter": (
            SCALER[spec.interpolation][1],
            f"NvBufSurfTransform_Inter {SCALER[spec.interpolation][0]} for the recipe's {spec.interpolation}"
            + (" (the GPU scaler has no area filter)" if spec.interpolation == "area" else ""),
        ),
        "scaling-compute-hw": (1, "1 = GPU (the filter the host measurement stands in for)"),
        "output-blob-names": PROBS,
        "classifier-threshold": (
            0.0,
            "attach the top class always"
            + ("; the line's reject decision: output-tensor-meta below" if threshold is not None else ""),
        ),
    }
    if threshold is not None:
        infer["output-tensor-meta"] = (
            1,
            f"the reject decision: class '{decision['positive_class']}' "
            f"probability >= {threshold:.6g} (the bundle's operating point) is the application's: "
            f"read the output tensor in a pad probe (classifier-threshold cannot reject on one class)",
        )
    unknown = sorted(set(infer) - keys)
    if unknown:  # a writer bug, never a user error: refuse to ship a config DeepStream would reject
        raise ExportError(f"DeepStream {ds_version} has no nvinfer keys {unknown}")
    return infer


def _app_config(job: DeepStreamJob, cam: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    """deepstream-app's groups for the bundle's camera, each key checked against the reference application's."""
    app = {
        "application": {"enable-perf-measurement": 1, "perf-measurement-interval-sec": 5},
        "tiled-display": {"enable": 0, "rows": 1, "columns": 1, "width": cam[0], "height": cam[1]},
        "source0": source_group(job.source, cam),
        "streammux": {
            "gpu-id": 0,
            "live-source": int(job.source.startswith(LIVE)),
            "batch-size": 1,
            "batched-push-timeout": 40000,
            "width": cam[0],
            "height": cam[1],
            "enable-padding": 0,
        },
        "primary-gie": {
            "enable": 1,
            "gpu-id": 0,
            "batch-size": job.batch,
            "gie-unique-id": 1,
            "config-file": INFER_CONFIG,
        },
        "osd": {"enable": 0},
        "sink0": {"enable": 1, "type": (1, "1 = fakesink (headless; 2 = EGL display)"), "sync": 0},
    }
    for group, values in app.items():
        unknown = sorted(set(values) - APP_KEYS[group])
        if unknown:
            raise ExportError(f"deepstream-app [{group}] has no keys {unknown}")
    return app


def write(job: DeepStreamJob) -> dict[str, Any]:
    """Write ``job.folder`` (the bundle's deepstream/): model(s), labels, and per DeepStream version an nvinfer config
    and a deepstream-app config. Returns the facts for the manifest."""
    folder, classes, spec = job.folder, job.classes, job.spec
    cam = parse_camera(job.camera)
    source_group(job.source, cam)  # refused before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    bad = [c for c in classes if _control(c)]
    if bad:
        raise ExportError(
            f"class names {bad!r} hold a line break or control character, which would split labels.txt and inject "
            "keys into DeepStream's config: rename the class folders"
        )
    if any(";" in c for c in classes):
        raise ExportError(
            "a class name holds ';', which DeepStream's classifier labels file uses as separator: "
            f"rename it ({[c for c in classes if ';' in c]})"
        )
    params = parameters(spec, job.folded)
    names = job.manifest_model["input_name"], job.manifest_model["output_name"]
    deepstream_model(job.bundle_model, folder / MODEL, spec, job.folded, *names)
    models = {"fp16": MODEL, "fp32": MODEL}
    if job.int8_file is not None:
        log.warning("DeepStream: %s", NO_INT8)
    (folder / LABELS).write_text(";".join(classes) + "\n")
    _, _, height, width = job.manifest_model["input_shape"]
    for sub, (ds_version, jetpack, keys) in VERSIONS.items():
        (folder / sub).mkdir(exist_ok=True)
        for precision, model_file in models.items():
            suffix = "" if precision == "fp16" else f"_{precision}"
            infer = _infer_config(job, precision, model_file, params, ds_version, keys)
            header = [
                f"nvinfer config for {job.name} ({precision.upper()}): DeepStream {ds_version} (JetPack {jetpack})",
                "written by edgedistill export; keys from gstnvinfer_property_parser.h of this release",
                f"model input {width}x{height}, classes in ../{LABELS}",
            ]
            (folder / sub / f"config_infer_primary{suffix}.txt").write_text(_ini({"property": infer}, header))
        (folder / sub / APP_CONFIG).write_text(
            _ini(
                _app_config(job, cam),
                [
                    f"deepstream-app config for {job.name}: DeepStream {ds_version} (JetPack {jetpack})",
                    f"run: deepstream-app -c {APP_CONFIG}   (source: {job.source}; change [source0] for another "
                    "camera)",
                ],
            )
        )
    return {
        "folder": FOLDER,
        "versions": {sub: {"deepstream": v[0], "jetpack": v[1]} for sub, v in VERSIONS.items()},
        "input": "uint8 (pixels, normalization folded)" if job.folded else "float (nvinfer normalizes)",
        "net_scale_factor": params["net_scale_factor"],
        "offsets": params["offsets"],
        "exact_normalization": params["exact"],
        "note": params["note"],
        "precisions": sorted(models),
        "int8": None if job.int8_file is None else NO_INT8,
        "reject": REJECT_NOTE if job.decision else None,
        "source": job.source,
    }


def check_config(path: Path, keys: frozenset = NVINFER_KEYS_7) -> dict[str, str]:
    """Parse an nvinfer config as GLib's key file does (groups, key=value, '#' comments) and refuse keys that
    release does not know; returns [property]."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(path)
    if "property" not in parser:
        raise ExportError(f"{path}: no [property] group")
    unknown = sorted(set(parser["property"]) - keys)
    if unknown:
        raise ExportError(f"{path}: keys DeepStream does not know: {unknown}")
    return dict(parser["property"])
