"""Signed bundles: a production line runs only the models it approved.

The manifest holds the sha256 of every other file of a bundle, so one Ed25519 signature over the manifest's
exact bytes covers the whole bundle, the manifest included. The signature lives next to it in
``manifest.sig`` (JSON: algorithm, key id, signature). On the device a *trust set* (one ``.pub`` file or a
folder of them) decides which signers are accepted; with a trust set, :func:`check_trust` refuses

- an unsigned bundle,
- a bundle signed by a key outside the trust set,
- a manifest changed after signing (the signature no longer matches),
- any file whose bytes differ from the manifest's sha256, and any file the manifest does not list.

Keys are PEM: the private key PKCS#8 (mode 0600, optionally encrypted with a passphrase), the public key
SubjectPublicKeyInfo (what ``openssl pkey -pubout`` writes). Uses ``cryptography`` (>= 2.6 for Ed25519; its
releases up to 40.x still install on Python 3.6 / JetPack 4.6); edgerun works without it while no trust is
configured. Runs on Python 3.6 and imports neither torch nor onnx.
"""

import base64
import hashlib
import json
import os
import re

from edgerun.bundle.manifest import MANIFEST_FILE, SIGNATURE_FILE
from edgerun.errors import SignatureError

SIGNATURE_FORMAT = "edgedistill-signature/1"
PUBLIC_SUFFIX = ".pub"
# The device's own trust folder: when it exists, every bundle must be signed by one of its keys.
DEFAULT_TRUST_DIR = "/etc/edgerun/trusted-keys"
TRUST_ENV = "EDGERUN_TRUST"
PASSPHRASE_ENV = "EDGEDISTILL_KEY_PASSPHRASE"


def _crypto():
    """The pieces of ``cryptography`` we use, or a SignatureError that says how to install it."""
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.backends import default_backend
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise SignatureError(
            "signed bundles need the 'cryptography' package (>= 2.6), which is not importable "
            "here (%s): pip3 install 'cryptography>=2.6' (on JetPack 4.6 / Python 3.6: "
            "'cryptography>=2.6,<41'), or remove the trust setting" % exc
        ) from exc
    return {
        "InvalidSignature": InvalidSignature,
        "UnsupportedAlgorithm": UnsupportedAlgorithm,
        "backend": default_backend(),
        "serialization": serialization,
        "ed25519": ed25519,
    }


def key_id(public_key):
    """A short, stable name of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    s = _crypto()["serialization"]
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(path, passphrase=None, force=False):
    """Write a new Ed25519 private key to ``path`` (mode 0600) and its public key to ``path.pub``.

    Refuses to overwrite an existing key unless ``force``: losing a signing key strands every device that
    trusts it. Returns (private path, public path, key id).
    """
    c = _crypto()
    s = c["serialization"]
    path = str(path)
    public_path = path + PUBLIC_SUFFIX
    for p in (path, public_path):
        if os.path.exists(p) and not force:
            raise SignatureError(
                "'%s' already exists; refusing to overwrite a key (pass --force to replace it, "
                "and re-sign every bundle)" % p
            )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent)
    private_key = c["ed25519"].Ed25519PrivateKey.generate()
    encryption = s.BestAvailableEncryption(passphrase.encode("utf-8")) if passphrase else s.NoEncryption()
    private_pem = private_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, encryption)
    public_pem = private_key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    if force and os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    os.chmod(path, 0o600)  # whatever the umask
    with open(public_path, "wb") as fh:
        fh.write(public_pem)
    return path, public_path, key_id(private_key.public_key())


def _read_key_file(path, what):
    try:
        with open(str(path), "rb") as fh:
            return fh.read()
    except (OSError, IOError) as exc:
        raise SignatureError("cannot read %s '%s': %s" % (what, path, exc)) from exc


def load_private_key(path, passphrase=None):
    c = _crypto()
    path = str(path)
    data = _read_key_file(path, "signing key")
    try:
        key = c["serialization"].load_pem_private_key(
            data, password=passphrase.encode("utf-8") if passphrase else None, backend=c["backend"]
        )
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise SignatureError("signing key '%s': %s (set %s to its passphrase)" % (path, exc, PASSPHRASE_ENV)) from exc
    except (ValueError, c["UnsupportedAlgorithm"]) as exc:
        raise SignatureError(
            "'%s' is not a PEM private key this host can read (%s); make one with "
            "`edgedistill keygen -o KEY`" % (path, exc)
        ) from exc
    if not isinstance(key, c["ed25519"].Ed25519PrivateKey):
        raise SignatureError("signing key '%s' is not an Ed25519 key; make one with `edgedistill keygen -o KEY`" % path)
    return key


_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)


def load_public_keys(path):
    """Every Ed25519 public key of a ``.pub`` file (PEM blocks one after the other); a file holding anything else,
    or no key, is refused rather than half read."""
    c = _crypto()
    data = _read_key_file(path, "trusted key")
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise SignatureError(
            "trusted key '%s' holds no PEM public key: copy the KEY.pub that `edgedistill keygen` wrote" % path
        )
    if _PEM_BLOCK.sub(b"", data).strip():
        raise SignatureError(
            "trusted key '%s' holds text outside its PEM public keys: every part of a trust file "
            "must be a key, or it is refused (nothing in it is trusted)" % path
        )
    keys = []
    for n, block in enumerate(blocks, 1):
        try:
            key = c["serialization"].load_pem_public_key(block, backend=c["backend"])
        except (ValueError, c["UnsupportedAlgorithm"]) as exc:
            raise SignatureError(
                "key %d of trusted key file '%s' is not a PEM public key this host can read (%s)" % (n, path, exc)
            ) from exc
        if not isinstance(key, c["ed25519"].Ed25519PublicKey):
            raise SignatureError("key %d of trusted key file '%s' is not an Ed25519 public key" % (n, path))
        keys.append(key)
    return keys


def load_public_key(path):
    """The one key of a single-key ``.pub`` file."""
    keys = load_public_keys(path)
    if len(keys) != 1:
        raise SignatureError("'%s' holds %d public keys, one was expected" % (path, len(keys)))
    return keys[0]


def load_trust(path):
    """{key id: public key} from one ``.pub`` file or every ``*.pub`` in a folder."""
    path = str(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(PUBLIC_SUFFIX))
        if not files:
            raise SignatureError(
                "trust folder '%s' holds no %s files: copy the signer's KEY.pub into it, or "
                "remove the folder to run unsigned bundles" % (path, PUBLIC_SUFFIX)
            )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise SignatureError("trusted key or folder '%s' does not exist" % path)
    keys = {}
    for name in files:
        for key in load_public_keys(name):
            keys[key_id(key)] = key
    return keys


def resolve_trust(explicit=None, environ=None, default_dir=None):
    """Where the trust set comes from: --trust, else $EDGERUN_TRUST, else the device's trust folder if it
    exists; None means no trust is configured (unsigned bundles run). A trust given but empty (``--trust ''``,
    ``--trust "$UNSET"``, ``EDGERUN_TRUST=``) is an error: verification never turns off by accident."""
    from edgerun.settings import Setting, resolve_setting

    setting = Setting(
        flag="--trust",
        env_name=TRUST_ENV,
        exists=os.path.isdir,
        error=SignatureError,
        default=DEFAULT_TRUST_DIR if default_dir is None else default_dir,
        what="a KEY.pub or a folder of them",
        off="verification",
    )
    return resolve_setting(explicit, setting, environ)


def sign_bundle(folder, private_key_path, passphrase=None):
    """Sign ``folder``'s manifest after checking every file against it; writes ``manifest.sig``.

    Returns the signer's key id.
    """
    from edgerun.bundle.manifest import load_manifest

    folder = str(folder)
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    manifest = load_manifest(manifest_path)
    manifest.verify_files(folder)  # never vouch for a bundle that is already damaged
    _check_listed_only(folder, manifest)
    key = load_private_key(private_key_path, passphrase)
    with open(manifest_path, "rb") as fh:
        data = fh.read()
    record = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "signed_file": MANIFEST_FILE,
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }
    tmp = os.path.join(folder, "." + SIGNATURE_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, os.path.join(folder, SIGNATURE_FILE))
    return record["key_id"]


def _check_listed_only(folder, manifest):
    listed = set(manifest.data["files"])
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel in (MANIFEST_FILE, SIGNATURE_FILE) or rel in listed:
                continue
            raise SignatureError(
                "bundle file '%s' is not listed in the manifest, so no signature covers it; "
                "remove it (a signed bundle holds only its manifest's files)" % rel
            )


def read_signature(folder):
    path = os.path.join(str(folder), SIGNATURE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, IOError, ValueError) as exc:
        raise SignatureError("signature file '%s' is unreadable: %s" % (path, exc)) from exc
    if (
        not isinstance(record, dict)
        or record.get("format") != SIGNATURE_FORMAT
        or record.get("algorithm") != "ed25519"
        or not isinstance(record.get("signature"), str)
    ):
        raise SignatureError("signature file '%s' is not an %s Ed25519 signature" % (path, SIGNATURE_FORMAT))
    return record


def verify_signature(folder, trusted, trust_source="the trust set", manifest_bytes=None):
    """Check ``folder``'s signature against ``trusted`` ({key id: public key}); returns the signer's key id.

    ``manifest_bytes``: the manifest exactly as it was read and parsed (default: read here), so what is verified is
    what is used. Raises SignatureError naming what failed: no signature, an untrusted signer, a manifest that
    changed after signing, or a signature that does not verify at all. The files themselves are checked by
    :func:`check_trust`.
    """
    c = _crypto()
    folder = str(folder)
    record = read_signature(folder)
    if record is None:
        raise SignatureError(
            "bundle '%s' is unsigned, and %s requires a signature from one of its keys (%s): "
            "sign it on the workstation with `edgedistill pack BUNDLE -o X.edb --sign KEY`"
            % (folder, trust_source, ", ".join(sorted(trusted)))
        )
    data = manifest_bytes
    if data is None:
        with open(os.path.join(folder, MANIFEST_FILE), "rb") as fh:
            data = fh.read()
    try:
        signature = base64.b64decode(record["signature"].encode("ascii"))
    except (ValueError, TypeError) as exc:
        raise SignatureError("signature in '%s' is not base64: %s" % (folder, exc)) from exc
    for kid, key in sorted(trusted.items()):
        try:
            key.verify(signature, data)
            return kid
        except c["InvalidSignature"]:
            continue
    signer = record.get("key_id", "?")
    digest = hashlib.sha256(data).hexdigest()
    if signer in trusted and record.get("manifest_sha256") == digest:
        raise SignatureError(
            "bundle '%s': invalid signature: it names trusted key %s and the manifest is the one it "
            "claims to sign (sha256 %s...), but the signature does not verify with that key: it is "
            "forged or damaged; do not run this bundle" % (folder, signer, digest[:12])
        )
    if signer in trusted:
        raise SignatureError(
            "bundle '%s': %s was changed after it was signed (its signature by trusted key %s no "
            "longer matches; sha256 now %s..., signed %s...): re-export and re-sign it, or copy "
            "the original again"
            % (
                folder,
                MANIFEST_FILE,
                signer,
                hashlib.sha256(data).hexdigest()[:12],
                str(record.get("manifest_sha256", "?"))[:12],
            )
        )
    raise SignatureError(
        "bundle '%s' is signed by key %s, which is not in %s (trusted: %s): add that signer's "
        "KEY.pub to the trust set if it is approved" % (folder, signer, trust_source, ", ".join(sorted(trusted)))
    )


def check_trust(folder, manifest, trust_path, manifest_bytes=None, digests=None):
    """The whole check for a trusted device: signature (over ``manifest_bytes``, the bytes parsed into
    ``manifest``), then every file's bytes (``digests``: computed while unpacking them), then no unlisted files."""
    trusted = load_trust(trust_path)
    signer = verify_signature(folder, trusted, trust_source="trust '%s'" % trust_path, manifest_bytes=manifest_bytes)
    manifest.verify_files(folder, digests)
    _check_listed_only(folder, manifest)
    return signer
