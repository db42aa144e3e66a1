"""Open, verify and pack bundles (a folder, or one .edb file = a gzip tar of that folder)."""

import hashlib
import os
import shutil

import numpy as np

from edgerun.bundle.archive import Limits, pack_folder, unpack_private
from edgerun.bundle.manifest import MANIFEST_FILE, read_manifest
from edgerun.errors import BundleError, UnsafeArchiveError

BUNDLE_SUFFIX = ".edb"


class Bundle(object):
    """A verified bundle on disk: ``folder``, ``manifest`` and helpers to reach its files."""

    def __init__(self, folder, manifest, signer=None, trust=None, manifest_sha256=None, pinned_by=None):
        self.folder = folder
        self.manifest = manifest
        self.signer = signer  # the trusted key id that signed it, when opened with a trust set
        self.trust = trust  # that trust set (a .pub file or a folder of them), or None
        self.manifest_sha256 = manifest_sha256  # of the manifest bytes parsed: what pins and `edgerun pin` name
        self.pinned_by = pinned_by  # the pin rule that admitted it, when opened with a pins file

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
            raise BundleError(
                "bundle has no '%s' variant (has: %s)"
                % (variant, ", ".join(sorted(self.manifest.data.get("variants", {}))) or "none")
            )
        return self.path(entry["file"])

    def calibration(self):
        """Model-ready float32 calibration batch (memory-mapped: large sets stay on disk)."""
        return np.load(self.path(self.manifest.data["samples"]["calib"]["file"]), mmap_mode="r", allow_pickle=False)

    def validation(self):
        """(raw uint8 RGB images, int64 labels) for accuracy checks on the device."""
        with np.load(self.path(self.manifest.data["samples"]["val"]["file"]), allow_pickle=False) as data:
            return data["images"], data["labels"]


def open_bundle(path, workdir=None, verify=True, trust=None, max_unpack_mb=None, pins=None):
    """Open a bundle folder or .edb file; an archive is unpacked (checked member by member, within the size caps:
    ``max_unpack_mb``, else $EDGERUN_MAX_UNPACK_MB, else 1 GB) into a folder private to this process first.

    ``trust``: a public key file or folder of them (see :mod:`edgerun.bundle.signing`); with it the bundle must be
    signed by one of those keys and every byte must match, whatever ``verify`` says. The signature is checked over
    the manifest bytes that are parsed, and an archive's files against the hashes of the bytes unpacked; a refused
    archive leaves nothing behind. ``pins``: a pins file (see :mod:`edgerun.bundle.pins`) the bundle must pass after
    that.
    """
    path = str(path)
    if not os.path.exists(path):
        raise BundleError("bundle '%s' does not exist" % path)
    digests, private = None, False
    if os.path.isdir(path):
        folder = path
    else:
        folder, digests = unpack_private(path, workdir, Limits.for_bundles(max_unpack_mb))
        private = True
    try:
        manifest_path = os.path.join(folder, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise BundleError("'%s' has no %s: is it an edgedistill bundle?" % (path, MANIFEST_FILE))
        manifest, raw = read_manifest(manifest_path)
        for name in list(manifest.data["files"]) + [
            v.get("file") for v in manifest.data.get("variants", {}).values() if isinstance(v, dict) and v.get("file")
        ]:
            inner = os.path.normpath(os.path.join(folder, name))
            if os.path.isabs(name) or not inner.startswith(os.path.normpath(folder) + os.sep):
                raise BundleError("manifest of '%s' names a file outside the bundle ('%s'); refusing it" % (path, name))
        signer = None
        if trust:
            from edgerun.bundle.signing import check_trust

            signer = check_trust(folder, manifest, trust, raw, digests)
        elif verify or pins:
            manifest.verify_files(folder, digests)
        digest = hashlib.sha256(raw).hexdigest()
        pinned_by = None
        if pins:
            from edgerun.bundle.pins import check_pins

            pinned_by = check_pins(manifest, digest, pins, signed=bool(trust), bundle_path=path)
        return Bundle(
            folder, manifest, signer=signer, trust=trust if trust else None, manifest_sha256=digest, pinned_by=pinned_by
        )
    except BaseException:
        if private:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def pack_bundle(folder, output, sign_key=None, passphrase=None):
    """Verify a bundle folder (signing its manifest with ``sign_key`` if given), then write it as one .edb
    file; returns the file's path."""
    bundle = open_bundle(folder)
    if sign_key:
        from edgerun.bundle.signing import sign_bundle

        sign_bundle(bundle.folder, sign_key, passphrase)
    output = str(output)
    if not output.endswith(BUNDLE_SUFFIX):
        output += BUNDLE_SUFFIX
    inside = os.path.realpath(os.path.abspath(output))
    if inside.startswith(os.path.realpath(bundle.folder) + os.sep):
        raise UnsafeArchiveError("-o '%s' is inside the bundle folder it packs: write the .edb elsewhere" % output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        os.makedirs(parent)
    try:
        return pack_folder(bundle.folder, output)
    finally:
        if os.path.exists(output + ".tmp"):
            os.remove(output + ".tmp")  # a refused or interrupted pack leaves nothing half written
