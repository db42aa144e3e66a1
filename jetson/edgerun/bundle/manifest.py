"""The bundle manifest: the one contract between the workstation (edgedistill) and the device (edgerun).

A bundle is a folder (or its .edb archive) holding ``manifest.json``, ``model.onnx``, ``calib.npy`` and
``val.npz`` (and optional variants such as ``model.int8.onnx``). The manifest says how to feed the
model (input name, shape, layout, preprocessing: the facts timm keeps in ``pretrained_cfg``), what it
predicts (class names), what was measured on the host, and the sha256 of every file.

This module is the schema's only definition. It runs on Python 3.6 and imports neither torch nor onnx.
"""

import hashlib
import json
import os

from edgerun.errors import BundleError
from edgerun.preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # an Ed25519 signature over manifest.json's bytes (see signing.py)

# key -> type(s) required at the top level of a manifest
REQUIRED = {
    "schema_version": int,
    "name": str,
    "classes": list,
    "model": dict,
    "preprocess": dict,
    "target": str,
    "files": dict,
    "samples": dict,
    "metrics": dict,
    "versions": dict,
    "source": dict,
}
TASKS = ("classification", "regression", "anomaly")  # optional key "task"; absent: classification
ANOMALY_CLASSES = ["good", "defective"]  # an anomaly bundle's two classes: val.npz labels 0 and 1
MODEL_KEYS = ("file", "input_name", "input_shape", "output_name", "output_shape", "layout", "dtype", "opset")


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


class Manifest(object):
    """A validated manifest; ``data`` is the plain JSON dictionary."""

    def __init__(self, data, source="manifest"):
        self.source = source
        self.data = data
        self.validate()

    # -- schema ---------------------------------------------------------------------------------------------
    def validate(self):
        data, where = self.data, self.source
        if not isinstance(data, dict):
            raise BundleError("%s: a manifest is a JSON object, not %s" % (where, type(data).__name__))
        version = data.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise BundleError(
                "%s: bundle schema version %d is newer than this edgerun understands (%d): upgrade "
                "edgerun on the device (pip3 install -U ./jetson from the same edgedistill release "
                "that made the bundle)" % (where, version, SCHEMA_VERSION)
            )
        for key, kind in sorted(REQUIRED.items()):
            if key not in data:
                raise BundleError("%s: required key '%s' is missing" % (where, key))
            if not isinstance(data[key], kind):
                raise BundleError(
                    "%s: key '%s' must be %s, not %s" % (where, key, kind.__name__, type(data[key]).__name__)
                )
        if version < 1:
            raise BundleError("%s: schema_version must be >= 1" % where)
        for key in MODEL_KEYS:
            if key not in data["model"]:
                raise BundleError("%s: required key 'model.%s' is missing" % (where, key))
        try:
            spec = PreprocessSpec.from_dict(data["preprocess"])
        except (TypeError, ValueError) as exc:
            raise BundleError("%s: invalid 'preprocess': %s" % (where, exc)) from exc
        self._check_files(data, where)
        self._check_input(data["model"], spec, where)
        self._check_samples(data, where)
        if data["model"]["file"] not in data["files"]:
            raise BundleError("%s: model.file '%s' has no sha256 under 'files'" % (where, data["model"]["file"]))
        if not data["classes"]:
            raise BundleError("%s: 'classes' is empty" % where)
        task = data.get("task", "classification")
        if task not in TASKS:
            raise BundleError("%s: 'task' is '%s'; this edgerun knows %s" % (where, task, ", ".join(TASKS)))
        if task == "regression":
            from edgerun.regression import check_targets

            check_targets(data, where)
        if task == "anomaly":
            if data["classes"] != ANOMALY_CLASSES:
                raise BundleError(
                    "%s: an anomaly bundle's classes are %s (val.npz labels 0 and 1), not %r"
                    % (where, ANOMALY_CLASSES, data["classes"])
                )
            if not isinstance(data["model"].get("map_name"), str):
                raise BundleError(
                    "%s: an anomaly bundle names its anomaly-map output in model.map_name (model.output_name is "
                    "the image score): re-export the bundle" % where
                )
        from edgerun.decision import check_decision

        check_decision(data, where)

    @staticmethod
    def _check_files(data, where):
        for name, digest in data["files"].items():
            if not isinstance(digest, str) or len(digest) != 64:
                raise BundleError("%s: files['%s'] must be a sha256 (64 hex digits), not %r" % (where, name, digest))
        if not all(isinstance(c, str) for c in data["classes"]):
            raise BundleError("%s: 'classes' must be names (strings)" % where)

    @staticmethod
    def _check_input(model, spec, where):
        """model.input_shape is four whole numbers laid out as the preprocessing lays the images out (NCHW or
        NHWC), three channels, and the crop's height and width: what edgerun feeds is what the model takes."""
        shape, layout = model["input_shape"], model["layout"]
        if not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int and d > 0 for d in shape):
            raise BundleError("%s: model.input_shape must be four positive whole numbers, not %r" % (where, shape))
        if layout not in ("NCHW", "NHWC"):
            raise BundleError("%s: model.layout must be 'NCHW' or 'NHWC', not %r" % (where, layout))
        if spec.layout != layout:
            raise BundleError(
                "%s: preprocess.layout is '%s' but model.layout is '%s': edgerun would feed the model images laid "
                "out the wrong way; re-export the bundle" % (where, spec.layout, layout)
            )
        channels, size = (shape[1], tuple(shape[2:])) if layout == "NCHW" else (shape[3], tuple(shape[1:3]))
        if channels != 3 or size != spec.crop:
            raise BundleError(
                "%s: model.input_shape %s (%s) does not take 3-channel images of preprocess.crop %s: re-export "
                "the bundle" % (where, shape, layout, list(spec.crop))
            )

    @staticmethod
    def _check_samples(data, where):
        """samples.val (the images validate checks, and the camera's references) must be there; calib where given."""
        for key, required in (("val", True), ("calib", False)):
            entry = data["samples"].get(key)
            if entry is None and not required:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise BundleError(
                    "%s: samples.%s must name its file ({'file': ..., 'count': ...}), not %r: re-export the "
                    "bundle" % (where, key, entry)
                )
            if entry["file"] not in data["files"]:
                raise BundleError("%s: samples.%s.file '%s' has no sha256 under 'files'" % (where, key, entry["file"]))
            if type(entry.get("count")) is not int or entry["count"] < 0:
                raise BundleError(
                    "%s: samples.%s.count must be a whole number, not %r" % (where, key, entry.get("count"))
                )

    # -- accessors ------------------------------------------------------------------------------------------
    @property
    def preprocess(self):
        return PreprocessSpec.from_dict(self.data["preprocess"])

    @property
    def classes(self):
        """Class names; for a regression bundle, the target names (one output each)."""
        return list(self.data["classes"])

    @property
    def task(self):
        return self.data.get("task", "classification")

    @property
    def targets(self):
        """Regression: {names, mean, std} that turn the model's standardized outputs into target units."""
        return self.data.get("targets")

    @property
    def decision(self):
        """The line's reject decision ({metric, positive_class, threshold, operating_point, ...}), or {}."""
        return dict(self.data.get("decision") or {})

    @property
    def model(self):
        return dict(self.data["model"])

    @property
    def input_name(self):
        return self.data["model"]["input_name"]

    @property
    def output_name(self):
        return self.data["model"]["output_name"]

    @property
    def input_shape(self):
        return tuple(self.data["model"]["input_shape"])

    def variant(self, name):
        return self.data.get("variants", {}).get(name)

    def to_json(self):
        return json.dumps(self.data, indent=2, sort_keys=True)

    # -- files ----------------------------------------------------------------------------------------------
    def verify_files(self, folder, digests=None):
        """Check every listed file's sha256; raise BundleError naming the first that fails. ``digests`` ({name:
        sha256}) are hashes taken of the bytes as they were written while unpacking (the files are then not read
        a second time to be checked)."""
        for name, expected in sorted(self.data["files"].items()):
            path = os.path.join(folder, name)
            if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                raise BundleError("manifest lists an unsafe file name '%s'" % name)
            if not os.path.isfile(path):
                raise BundleError("bundle file '%s' listed in the manifest is missing from %s" % (name, folder))
            actual = digests[name] if digests is not None and name in digests else sha256_file(path)
            if actual != expected:
                raise BundleError(
                    "bundle file '%s' fails its sha256 check (expected %s..., found %s...): it was "
                    "changed or damaged after export; copy the bundle again" % (name, expected[:12], actual[:12])
                )


def read_manifest(path):
    """(Manifest, the exact bytes it was parsed from): one read, so a signature is checked over what is used."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, IOError) as exc:
        raise BundleError("cannot read manifest '%s': %s" % (path, exc)) from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError("manifest '%s' is not valid JSON: %s" % (path, exc)) from exc
    return Manifest(data, source=str(path)), raw


def load_manifest(path):
    return read_manifest(path)[0]


def write_manifest(folder, data):
    """Fill ``files`` with the sha256 of every other file in ``folder``, validate, write atomically."""
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in (MANIFEST_FILE, SIGNATURE_FILE) and not name.startswith("."):
                files[rel] = sha256_file(os.path.join(root, name))
    data = dict(data, files=files, schema_version=SCHEMA_VERSION)
    stale = os.path.join(folder, SIGNATURE_FILE)
    if os.path.exists(stale):  # it signed the manifest being replaced: sign the new one again
        os.remove(stale)
    manifest = Manifest(data, source=os.path.join(folder, MANIFEST_FILE))
    tmp = os.path.join(folder, "." + MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(manifest.to_json())
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))
    return manifest
