"""Open, verify and pack bundles (a folder, or one .edb file = a gzip tar of that folder)."""
import os
import tempfile

import numpy as np

from .archive import pack_folder, safe_extract
from .errors import BundleError
from .manifest import MANIFEST_FILE, load_manifest

BUNDLE_SUFFIX = ".edb"


class Bundle(object):
    """A verified bundle on disk: ``folder``, ``manifest`` and helpers to reach its files."""

    def __init__(self, folder, manifest, signer=None, trust=None):
        self.folder = folder
        self.manifest = manifest
        self.signer = signer  # the trusted key id that signed it, when opened with a trust set
        self.trust = trust  # that trust set (a .pub file or a folder of them), or None

    def path(self, name):
        return os.path.join(self.folder, name)

    @property
    def model_path(self):
        return self.path(self.manifest.model["file"])

    def variant_path(self, variant):
        """The ONNX file of ``fp32`` (model.onnx) or a named variant (``int8``, ``int8_trt``)."""
        if variant in (None, "fp32", "fp16"):
            return self.model_path
        entry = self.manifest.variant(variant)
        if not entry:
            raise BundleError("bundle has no '%s' variant (has: %s)" % (
                variant, ", ".join(sorted(self.manifest.data.get("variants", {}))) or "none"))
        return self.path(entry["file"])

    def calibration(self):
        """Model-ready float32 calibration batch (memory-mapped: large sets stay on disk)."""
        return np.load(self.path(self.manifest.data["samples"]["calib"]["file"]), mmap_mode="r",
                       allow_pickle=False)

    def validation(self):
        """(raw uint8 RGB images, int64 labels) for accuracy checks on the device."""
        with np.load(self.path(self.manifest.data["samples"]["val"]["file"]), allow_pickle=False) as data:
            return data["images"], data["labels"]


def open_bundle(path, workdir=None, verify=True, trust=None):
    """Open a bundle folder or .edb file; an archive is unpacked (checked member by member) first.

    ``trust``: a public key file or folder of them (see :mod:`edgerun.signing`); with it the bundle must be
    signed by one of those keys and every byte must match, whatever ``verify`` says.
    """
    path = str(path)
    if not os.path.exists(path):
        raise BundleError("bundle '%s' does not exist" % path)
    if os.path.isdir(path):
        folder = path
    else:
        base = workdir or os.path.join(tempfile.gettempdir(), "edgerun-bundles")
        stem = os.path.basename(path)
        if stem.endswith(BUNDLE_SUFFIX):
            stem = stem[:-len(BUNDLE_SUFFIX)]
        folder = safe_extract(path, os.path.join(base, stem))
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise BundleError("'%s' has no %s: is it an edgedistill bundle?" % (path, MANIFEST_FILE))
    manifest = load_manifest(manifest_path)
    if trust:
        from .signing import check_trust

        return Bundle(folder, manifest, signer=check_trust(folder, manifest, trust), trust=trust)
    if verify:
        manifest.verify_files(folder)
    return Bundle(folder, manifest)


def pack_bundle(folder, output, sign_key=None, passphrase=None):
    """Verify a bundle folder (signing its manifest with ``sign_key`` if given), then write it as one .edb
    file; returns the file's path."""
    bundle = open_bundle(folder)
    if sign_key:
        from .signing import sign_bundle

        sign_bundle(bundle.folder, sign_key, passphrase)
    output = str(output)
    if not output.endswith(BUNDLE_SUFFIX):
        output += BUNDLE_SUFFIX
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        os.makedirs(parent)
    return pack_folder(bundle.folder, output)
