"""Signed bundles: keygen -> pack --sign -> the device accepts it, and refuses every other case with the reason."""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest

from edgedistill.cli import main as edgedistill
from edgerun.bundle import open_bundle
from edgerun.cli import main as edgerun
from edgerun.errors import BundleError, SignatureError
from edgerun.manifest import SIGNATURE_FILE, load_manifest, write_manifest
from edgerun.signing import generate_keypair, resolve_trust, sign_bundle


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    assert edgedistill(["keygen", "-o", str(root / "line.key")]) == 0
    assert edgedistill(["keygen", "-o", str(root / "other.key")]) == 0
    return root


@pytest.fixture
def bundle_copy(trained_run, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained_run / "bundle", folder)
    (folder / SIGNATURE_FILE).unlink(missing_ok=True)
    return folder


def _flip_one_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites_it(keys, capsys):
    private, public = keys / "line.key", keys / "line.key.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    assert edgedistill(["keygen", "-o", str(private)]) == 2
    assert "already exists" in capsys.readouterr().err and private.read_bytes() == before


def test_a_signed_bundle_round_trips_and_the_device_names_its_signer(bundle_copy, keys, tmp_path, capsys):
    edb = tmp_path / "student.edb"
    assert edgedistill(["pack", str(bundle_copy), "-o", str(edb), "--sign", str(keys / "line.key")]) == 0
    err = capsys.readouterr().err
    kid = json.loads((bundle_copy / SIGNATURE_FILE).read_text())["key_id"]
    assert kid in err and len(kid) == 16
    trust = str(keys / "line.key.pub")
    assert edgerun(["verify", str(edb), "--trust", trust]) == 0
    out = capsys.readouterr().out
    assert f"valid, by trusted key {kid}" in out
    assert edgerun(["validate", str(edb), "--trust", trust, "--max-drop", "1"]) == 0
    assert f"signed by trusted key {kid}" in capsys.readouterr().err
    # a folder of trusted keys works the same, and the key id is the signer's whichever file holds it
    trust_dir = tmp_path / "trusted"
    trust_dir.mkdir()
    for name in ("other.key.pub", "line.key.pub"):
        shutil.copy(keys / name, trust_dir / name)
    assert open_bundle(edb, workdir=str(tmp_path / "unpack"), trust=str(trust_dir)).signer == kid
    # without a trust set the signature is reported, not checked
    assert edgerun(["verify", str(edb)]) == 0
    assert "not checked: no trust set" in capsys.readouterr().out


def test_one_changed_byte_in_any_file_is_refused_by_name(bundle_copy, keys, tmp_path):
    sign_bundle(bundle_copy, keys / "line.key")
    trust = str(keys / "line.key.pub")
    _flip_one_byte(bundle_copy / "model.onnx")
    with pytest.raises(BundleError, match=r"'model.onnx' fails its sha256 check"):
        open_bundle(bundle_copy, trust=trust)


def test_a_changed_manifest_is_refused_even_with_its_hashes_rewritten(bundle_copy, keys):
    sign_bundle(bundle_copy, keys / "line.key")
    trust = str(keys / "line.key.pub")
    # an attacker swaps the model and rewrites the manifest's sha256 to match: the files check passes ...
    _flip_one_byte(bundle_copy / "model.onnx")
    data = json.loads((bundle_copy / "manifest.json").read_text())
    signature = (bundle_copy / SIGNATURE_FILE).read_bytes()
    write_manifest(str(bundle_copy), data)  # rehashes every file (and drops the stale signature) ...
    assert not (bundle_copy / SIGNATURE_FILE).exists()
    (bundle_copy / SIGNATURE_FILE).write_bytes(signature)  # ... which the attacker puts back
    load_manifest(str(bundle_copy / "manifest.json")).verify_files(str(bundle_copy))
    # ... and the signature does not
    with pytest.raises(SignatureError, match="manifest.json was changed after it was signed"):
        open_bundle(bundle_copy, trust=trust)
    # a one-byte change of the manifest itself, too
    sign_bundle(bundle_copy, keys / "line.key")
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace('"name": "', '"name": "X', 1))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        open_bundle(bundle_copy, trust=trust)


def test_unsigned_bundles_and_foreign_keys_are_refused(bundle_copy, keys, capsys):
    trust = str(keys / "line.key.pub")
    assert edgerun(["bench", str(bundle_copy), "--trust", trust, "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "is unsigned" in err and "--sign KEY" in err
    sign_bundle(bundle_copy, keys / "other.key")
    assert edgerun(["validate", str(bundle_copy), "--trust", trust]) == 2
    assert "not in trust" in capsys.readouterr().err
    with pytest.raises(SignatureError, match="not in trust"):
        open_bundle(bundle_copy, trust=trust)


def test_files_the_manifest_does_not_list_are_refused_in_a_trusted_bundle(bundle_copy, keys):
    sign_bundle(bundle_copy, keys / "line.key")
    (bundle_copy / "extra.onnx").write_bytes(b"not covered by any signature")
    with pytest.raises(SignatureError, match="'extra.onnx' is not listed in the manifest"):
        open_bundle(bundle_copy, trust=str(keys / "line.key.pub"))
    with pytest.raises(SignatureError, match="not listed"):  # nor is such a bundle signed
        sign_bundle(bundle_copy, keys / "line.key")


def test_the_device_trust_folder_and_environment_turn_trust_on(bundle_copy, keys, tmp_path, monkeypatch, capsys):
    import edgerun.signing as signing

    assert resolve_trust(None, environ={}, default_dir=str(tmp_path / "absent")) is None
    folder = tmp_path / "etc-trust"
    folder.mkdir()
    monkeypatch.setattr(signing, "DEFAULT_TRUST_DIR", str(folder))
    monkeypatch.delenv(signing.TRUST_ENV, raising=False)
    assert edgerun(["verify", str(bundle_copy)]) == 2  # an empty trust folder is a configuration error
    assert "holds no .pub files" in capsys.readouterr().err
    shutil.copy(keys / "line.key.pub", folder / "line.pub")
    assert edgerun(["verify", str(bundle_copy)]) == 2  # no --trust given: the device's folder still applies
    assert "is unsigned" in capsys.readouterr().err
    sign_bundle(bundle_copy, keys / "line.key")
    assert edgerun(["verify", str(bundle_copy)]) == 0
    monkeypatch.setenv(signing.TRUST_ENV, str(keys / "other.key.pub"))  # the environment wins over the folder
    assert edgerun(["verify", str(bundle_copy)]) == 2
    assert "not in trust" in capsys.readouterr().err


def test_an_encrypted_key_needs_its_passphrase(bundle_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LINE_PASS", "correct horse")
    monkeypatch.delenv("EDGEDISTILL_KEY_PASSPHRASE", raising=False)
    key = tmp_path / "enc.key"
    assert edgedistill(["keygen", "-o", str(key), "--passphrase-env", "LINE_PASS"]) == 0
    assert "ENCRYPTED" in key.read_text()
    assert edgedistill(["pack", str(bundle_copy), "-o", str(tmp_path / "x.edb"), "--sign", str(key)]) == 2
    assert "EDGEDISTILL_KEY_PASSPHRASE" in capsys.readouterr().err
    monkeypatch.setenv("EDGEDISTILL_KEY_PASSPHRASE", "correct horse")
    assert edgedistill(["pack", str(bundle_copy), "-o", str(tmp_path / "x.edb"), "--sign", str(key)]) == 0
    assert open_bundle(tmp_path / "x.edb", workdir=str(tmp_path / "u"), trust=str(key) + ".pub").signer
    assert edgedistill(["keygen", "-o", str(tmp_path / "k2"), "--passphrase-env", "UNSET_VAR_X"]) == 2


def test_the_device_runs_unsigned_bundles_without_cryptography_until_trust_is_configured(bundle_copy, keys,
                                                                                           monkeypatch):
    for name in list(sys.modules):
        if name == "cryptography" or name.startswith("cryptography."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography -> ImportError
    assert open_bundle(bundle_copy).signer is None
    with pytest.raises(SignatureError, match=r"pip3 install 'cryptography>=2.6'"):
        open_bundle(bundle_copy, trust=str(keys / "line.key.pub"))


def test_re_export_drops_a_signature_that_no_longer_matches(bundle_copy, keys):
    sign_bundle(bundle_copy, keys / "line.key")
    data = json.loads((bundle_copy / "manifest.json").read_text())
    write_manifest(str(bundle_copy), data)
    assert not (bundle_copy / SIGNATURE_FILE).exists()
    assert SIGNATURE_FILE not in load_manifest(str(bundle_copy / "manifest.json")).data["files"]


def test_keys_of_another_kind_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (tmp_path / "ec.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    from edgerun.signing import load_private_key, load_trust

    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "ec.key")
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        load_trust(str(tmp_path / "ec.pub"))
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(SignatureError, match="holds no PEM public key"):
        load_trust(str(tmp_path / "junk.pub"))
    generate_keypair(tmp_path / "k")
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path / "k")
