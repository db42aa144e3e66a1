"""Signed bundles: keygen -> pack --sign -> the device accepts it, and refuses every other case with the reason."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest

from edgedistill.cli import main as edgedistill
from edgerun.bundle.bundle import open_bundle
from edgerun.bundle.manifest import SIGNATURE_FILE, load_manifest, write_manifest
from edgerun.bundle.signing import generate_keypair, resolve_trust, sign_bundle
from edgerun.cli import main as edgerun
from edgerun.errors import BundleError, SignatureError


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
    import edgerun.bundle.signing as signing

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


def test_the_device_runs_unsigned_bundles_without_cryptography_until_trust_is_configured(
    bundle_copy, keys, monkeypatch
):
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
    (tmp_path / "ec.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp_path / "ec.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    from edgerun.bundle.signing import load_private_key, load_trust

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


def _release(bundle_copy, keys, tmp_path, created, name=None, tag=None):
    """A signed .edb of the same model as it would be released on ``created`` (another manifest, same key)."""
    folder = tmp_path / ("release-" + (tag or created[:10]))
    shutil.copytree(bundle_copy, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["created"] = created
    if name:
        data["name"] = name
    write_manifest(folder, data)
    edb = tmp_path / (folder.name + ".edb")
    assert edgedistill(["pack", str(folder), "-o", str(edb), "--sign", str(keys / "line.key")]) == 0
    return edb


def test_pins_refuse_an_older_release_signed_by_the_same_key(bundle_copy, keys, tmp_path, capsys):
    """Rollback: without pins any older bundle by the approved key verifies; a pin names the rule that refuses it."""
    trust = str(keys / "line.key.pub")
    old = _release(bundle_copy, keys, tmp_path, "2026-10-01T08:00:00+00:00")
    new = _release(bundle_copy, keys, tmp_path, "2026-11-15T08:00:00+00:00")
    assert edgerun(["verify", str(old), "--trust", trust]) == 0  # the attack this closes
    capsys.readouterr()
    pins = tmp_path / "pins.json"
    assert edgerun(["pin", str(new), "--rule", "not_before", "--trust", trust, "--pins", str(pins)]) == 0
    assert json.loads(pins.read_text())["pins"]["fast"]["not_before"] == "2026-11-15T08:00:00+00:00"
    capsys.readouterr()
    assert edgerun(["validate", str(old), "--trust", trust, "--pins", str(pins)]) == 2
    err = capsys.readouterr().err
    assert "refused by pin 'fast'" in err and "rule 'not_before'" in err and "rollback" in err
    assert edgerun(["verify", str(new), "--trust", trust, "--pins", str(pins)]) == 0
    assert "pins: pin 'fast' (not_before 2026-11-15" in capsys.readouterr().out
    # the date is part of the signature: without a trust set the rule cannot hold, and says so
    assert edgerun(["verify", str(new), "--pins", str(pins)]) == 2
    assert "needs a trust set" in capsys.readouterr().err


def test_an_allow_list_runs_exactly_the_approved_manifests(bundle_copy, keys, tmp_path, capsys, monkeypatch):
    import edgerun.bundle.pins as pins_module

    trust = str(keys / "line.key.pub")
    old = _release(bundle_copy, keys, tmp_path, "2026-10-01T08:00:00+00:00")
    new = _release(bundle_copy, keys, tmp_path, "2026-11-15T08:00:00+00:00")
    other = _release(bundle_copy, keys, tmp_path, "2026-11-15T08:00:00+00:00", name="other-model", tag="other")
    pins = tmp_path / "pins.json"
    monkeypatch.setenv(pins_module.PINS_ENV, str(pins))  # where `pin` writes and every command reads
    assert edgerun(["pin", str(new), "--trust", trust]) == 0
    capsys.readouterr()
    assert edgerun(["verify", str(new), "--trust", trust]) == 0
    digest = [line for line in capsys.readouterr().out.splitlines() if line.startswith("manifest sha256")][0]
    assert digest.split()[2] in json.loads(pins.read_text())["pins"]["fast"]["allow"]
    assert edgerun(["verify", str(old)]) == 2  # holds without a signature: the manifest's digest names every byte
    assert "rule 'allow'" in capsys.readouterr().err
    assert edgerun(["verify", str(other), "--trust", trust]) == 2
    assert "no pin for model 'other-model' and refuses unpinned" in capsys.readouterr().err
    data = json.loads(pins.read_text())
    pins.write_text(json.dumps(dict(data, unpinned="allow")))
    assert edgerun(["verify", str(other), "--trust", trust]) == 0
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ('{"pins": {"m": {"newer_than": "2026-01-01"}}}', "unknown rule(s) newer_than"),
        ('{"pins": {"m": {"allow": ["abc"]}}}', "64 lowercase hex"),
        ('{"pins": {"m": {"not_before": "2026-13-01"}}}', "not a valid date"),
        ('{"pins": {"m": {"not_before": "last week"}}}', "not an ISO 8601"),
        ('{"pins": {}, "unpinned": "maybe"}', "'unpinned' is 'maybe'"),
        ('{"pinz": {}}', "must be a JSON object with a 'pins' object"),
    ],
)
def test_a_bad_pins_file_is_an_error_that_names_it(bundle_copy, tmp_path, capsys, content, words):
    pins = tmp_path / "pins.json"
    pins.write_text(content)
    assert edgerun(["verify", str(bundle_copy), "--pins", str(pins)]) == 2
    err = capsys.readouterr().err
    assert str(pins) in err and words in err


def test_empty_pins_settings_never_turn_the_pins_off(bundle_copy, monkeypatch, capsys):
    from edgerun.bundle.pins import PINS_ENV, parse_time

    assert edgerun(["verify", str(bundle_copy), "--pins", ""]) == 2
    assert "--pins is empty" in capsys.readouterr().err
    monkeypatch.setenv(PINS_ENV, " ")
    assert edgerun(["verify", str(bundle_copy)]) == 2
    assert "set but empty" in capsys.readouterr().err
    assert (
        parse_time("2026-11-01T09:00:00+01:00", "t")
        == parse_time("2026-11-01T08:00:00Z", "t")
        == parse_time("2026-11-01 08:00", "t")
    )
