"""Issue 18: what an outside attack and a careless user found, each fixed with a test that failed before the fix.
Private unpack folders (check and use of the same bytes), trust that never fails open, archive bombs, YAML alias
bombs, damaged archives as errors, the bench harness's own memory."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgerun.bundle.archive import Limits, safe_extract, unpack_private
from edgerun.bundle.bundle import open_bundle, pack_bundle
from edgerun.cli import main as edgerun_main
from edgerun.errors import BundleError, SignatureError, UnsafeArchiveError


def _tar(path: Path, members: dict, mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------- 1. the signature covers the bytes that run
def test_each_open_unpacks_into_a_fresh_private_folder_and_a_refusal_leaves_nothing(trained_run, tmp_path):
    edb = pack_bundle(trained_run / "bundle", tmp_path / "student.edb")
    work = tmp_path / "work"
    old_shared = work / "student"  # the name every process used to share (and rmtree)
    old_shared.mkdir(parents=True)
    (old_shared / "keep.txt").write_text("not ours")
    a, b = open_bundle(edb, workdir=work), open_bundle(edb, workdir=work)
    assert a.folder != b.folder and Path(a.folder).parent == Path(b.folder).parent == work
    for folder in (a.folder, b.folder):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert (old_shared / "keep.txt").read_text() == "not ours"  # an existing folder is never touched
    tampered = tmp_path / "tampered"
    shutil.copytree(trained_run / "bundle", tampered)
    with open(tampered / "model.onnx", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    from edgerun.bundle.archive import pack_folder

    bad = pack_folder(tampered, tmp_path / "bad.edb")
    before = set(os.listdir(work))
    with pytest.raises(BundleError, match="'model.onnx' fails its sha256"):
        open_bundle(bad, workdir=work)
    assert set(os.listdir(work)) == before  # the refused bundle's files are gone


@pytest.mark.slow
def test_two_processes_opening_bundles_of_one_file_name_never_run_each_others_model(trained_run, tmp_path):
    """Two `edgerun validate` processes at once, again and again, on two different bundles both named
    student.edb: each reports its own model's accuracy (the race swapped models in 4-6 of 25 runs)."""
    from test_trt import _untrained_bundle

    (tmp_path / "other-src").mkdir()
    other = _untrained_bundle(tmp_path / "other-src", "other", target="jetson-nano-jp4", int8=False)
    edbs = {}
    for name, folder in (("trained", trained_run / "bundle"), ("other", Path(other.folder))):
        (tmp_path / name).mkdir()
        edbs[name] = pack_bundle(folder, tmp_path / name / "student.edb")
    expected = {}
    for name, edb in edbs.items():
        out = tmp_path / f"{name}-ref.json"
        assert edgerun_main(["validate", edb, "--json", str(out), "--max-drop", "1"]) == 0
        expected[name] = json.loads(out.read_text())["top1"]
    assert expected["trained"] != expected["other"]
    env = dict(os.environ, TMPDIR=str(tmp_path / "shared-tmp"))  # the same temporary folder for both
    (tmp_path / "shared-tmp").mkdir()
    for round_ in range(5):
        procs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgerun",
                    "validate",
                    edb,
                    "--max-drop",
                    "1",
                    "--json",
                    str(tmp_path / f"{name}-{round_}.json"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name, edb in edbs.items()
        }
        for name, proc in procs.items():
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-500:]
            assert json.loads((tmp_path / f"{name}-{round_}.json").read_text())["top1"] == expected[name]
    assert not [n for n in os.listdir(tmp_path / "shared-tmp") if n.startswith("edgerun-")]  # removed at exit


# ------------------------------------------------------------------------------------ 3. trust never fails open
@pytest.fixture
def signed(trained_run, tmp_path):
    from edgedistill.cli import main as edgedistill_main

    assert edgedistill_main(["keygen", "-o", str(tmp_path / "line.key")]) == 0
    edb = tmp_path / "signed.edb"
    shutil.copytree(trained_run / "bundle", tmp_path / "b")
    pack_bundle(tmp_path / "b", edb, sign_key=str(tmp_path / "line.key"))
    return edb, tmp_path / "line.key.pub"


def test_an_empty_trust_is_an_error_never_verification_off(signed, monkeypatch, capsys):
    from edgerun.bundle.signing import resolve_trust

    edb, pub = signed
    with pytest.raises(SignatureError, match="--trust is empty"):
        resolve_trust("")
    with pytest.raises(SignatureError, match="EDGERUN_TRUST is set but empty"):
        resolve_trust(None, environ={"EDGERUN_TRUST": ""})
    assert resolve_trust(None, environ={}, default_dir="/nonexistent") is None  # nothing configured: unsigned runs
    assert edgerun_main(["verify", str(edb), "--trust", ""]) == 2
    assert "--trust is empty" in capsys.readouterr().err
    monkeypatch.setenv("EDGERUN_TRUST", " ")
    assert edgerun_main(["verify", str(edb)]) == 2
    assert "EDGERUN_TRUST is set but empty" in capsys.readouterr().err


def test_a_pub_file_with_several_keys_loads_them_all_and_junk_is_refused(signed, tmp_path):
    from edgedistill.cli import main as edgedistill_main
    from edgerun.bundle.signing import load_trust

    edb, pub = signed
    assert edgedistill_main(["keygen", "-o", str(tmp_path / "other.key")]) == 0
    both = tmp_path / "both.pub"
    both.write_bytes((tmp_path / "other.key.pub").read_bytes() + pub.read_bytes())  # the signer's key second
    assert len(load_trust(str(both))) == 2
    assert open_bundle(edb, workdir=tmp_path / "u", trust=str(both)).signer
    (tmp_path / "junk.pub").write_bytes(pub.read_bytes() + b"\nnot a key\n")
    with pytest.raises(SignatureError, match="text outside its PEM public keys"):
        load_trust(str(tmp_path / "junk.pub"))


def test_a_forged_signature_with_a_trusted_key_id_is_called_invalid(signed, tmp_path):
    import base64

    edb, pub = signed
    folder = tmp_path / "forged"
    safe_extract(edb, folder)
    record = json.loads((folder / "manifest.sig").read_text())
    record["signature"] = base64.b64encode(b"\x01" * 64).decode()  # the key id and manifest hash untouched
    (folder / "manifest.sig").write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="invalid signature.*forged or damaged"):
        open_bundle(folder, trust=str(pub))


# ------------------------------------------------------------------------------------------------ 5. bombs
def test_a_gigabyte_of_zeros_is_refused_before_anything_is_written(tmp_path):
    edb = tmp_path / "bomb.edb"
    with tarfile.open(edb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = 1 << 30

        class Zeros(io.RawIOBase):
            left = 1 << 30

            def readable(self):
                return True

            def readinto(self, buffer):
                n = min(len(buffer), self.left)
                buffer[:n] = b"\x00" * n
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    assert edb.stat().st_size < 8 << 20  # a few MB that declare a gigabyte
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match="declares 1024 MB of files, over the 1024 MB cap|over the .* MB cap"):
        open_bundle(edb, workdir=work, max_unpack_mb=512)
    assert sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) == 0  # nothing written
    assert edgerun_main(["verify", str(edb), "--max-unpack-mb", "512"]) == 2


def test_sparse_members_and_too_many_members_are_refused(tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse member")
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "disk.img", "wb") as fh:
        fh.truncate(100 << 30)  # 100 GB of holes
    subprocess.run(["tar", "--sparse", "-czf", str(tmp_path / "s.edb"), "-C", str(sparse), "disk.img"], check=True)
    with pytest.raises(UnsafeArchiveError, match="'disk.img' is a sparse file"):
        open_bundle(tmp_path / "s.edb", workdir=tmp_path / "w")
    many = _tar(tmp_path / "many.edb", {f"f{i}": b"x" for i in range(300)})
    with pytest.raises(UnsafeArchiveError, match="300 members, over the cap of 256"):
        open_bundle(many, workdir=tmp_path / "w")
    assert safe_extract(many, tmp_path / "data", Limits()) == str(tmp_path / "data")  # data sets have no such cap


# ---------------------------------------------------------------------- 6. one bad image never stops a data set
def _png_header(width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_images_over_the_pixel_limit_and_decoder_errors_are_skipped_and_listed(digits_folder, tmp_path, caplog):
    import cv2
    import numpy as np

    from edgedistill.data.images import header_size
    from edgedistill.data.sources import load_data
    from edgedistill.recipe.sections import DataConfig

    root = tmp_path / "parts"
    shutil.copytree(digits_folder, root)
    bomb = root / "train" / "digit3" / "bomb.png"
    bomb.write_bytes(_png_header(50000, 50000))  # 68 bytes that OpenCV answers with an exception
    big = root / "train" / "digit4" / "big.png"
    cv2.imwrite(str(big), np.zeros((2100, 2100), np.uint8))  # valid, 4.4 million pixels
    jpeg = root / "train" / "digit5" / "photo.jpg"
    cv2.imwrite(str(jpeg), np.full((30, 40, 3), 128, np.uint8))
    assert header_size(bomb.read_bytes()) == (50000, 50000) and header_size(jpeg.read_bytes()) == (40, 30)
    cfg = DataConfig(source="folder", root=str(root), image_size=16, max_pixels=4_000_000, cache=False)
    with caplog.at_level("WARNING"):
        data = load_data(cfg)
    skipped = {Path(p).name for p in data.train.skipped}
    assert skipped == {"bomb.png", "big.png"} and len(data.train) == 251  # 250 digits + the small JPEG
    text = caplog.text
    assert "50000x50000 pixels, over data.max_pixels 4,000,000" in text and "2100x2100 pixels" in text


# --------------------------------------------------------------------------- 7. YAML alias bombs in recipes
def test_yaml_aliases_are_refused_before_anything_expands(make_recipe, tmp_path):
    from edgedistill.errors import RecipeError
    from edgedistill.recipe.loading import load_recipe

    bomb = tmp_path / "bomb.yaml"
    rows = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)]
    bomb.write_text("name: bomb\n" + "\n".join(rows) + "\n")  # 10^9 elements once expanded
    with pytest.raises(RecipeError, match=r"YAML alias '\*a' at line 3: recipes do not take aliases"):
        load_recipe(bomb)
    with pytest.raises(RecipeError, match="--set teacher.model_kwargs: YAML alias"):
        load_recipe(make_recipe(), ["teacher.model_kwargs={a: &x [1], b: *x}"])


# ----------------------------------------------------------------------------- 8. damaged inputs are errors
def test_damaged_archives_and_misplaced_outputs_are_errors_with_exit_2(trained_run, tmp_path, capsys):
    edb = pack_bundle(trained_run / "bundle", tmp_path / "student.edb")
    data = Path(edb).read_bytes()
    Path(tmp_path / "cut.edb").write_bytes(data[: len(data) // 2])  # an interrupted copy
    assert edgerun_main(["verify", str(tmp_path / "cut.edb")]) == 2
    assert "truncated or damaged" in capsys.readouterr().err
    clash = _tar(tmp_path / "clash.edb", {"a": b"file", "a/b": b"then a folder of the same name"})
    with pytest.raises(UnsafeArchiveError, match="cannot unpack member 'a/b'.*clash"):
        unpack_private(clash, tmp_path / "w")
    newline = _tar(tmp_path / "nl.edb", {"evil\nname/../x": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'evil\\nname/../x' climbs out"):
        unpack_private(newline, tmp_path / "w")
    with pytest.raises(UnsafeArchiveError, match="inside the bundle folder"):
        pack_bundle(trained_run / "bundle", trained_run / "bundle" / "x.edb")
    assert not list((trained_run / "bundle").glob("*.tmp")) and not (trained_run / "bundle" / "x.edb").exists()
    outside = tmp_path / "outside"
    shutil.copytree(trained_run / "bundle", outside)
    manifest = json.loads((outside / "manifest.json").read_text())
    manifest["variants"]["int8"]["file"] = "../../etc/passwd"
    (outside / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="names a file outside the bundle"):
        open_bundle(outside, verify=False)


# ------------------------------------------------------------ 9. the bench harness does not inflate its memory
@pytest.mark.slow
def test_bench_memory_grows_by_no_more_than_its_frames(trained_run, tmp_path):
    """VmHWM of a whole bench at 1920x1080 frames against 64x48: the difference is at most the frames themselves
    (4 of them) plus a margin, not 8x them (int64 draws cast to uint8)."""
    code = (
        "import json, sys; from edgerun.bundle.bundle import open_bundle; "
        "from edgerun.bench import BenchJob, run_bench; "
        "from edgerun.runtime.runners import OrtRunner; from edgerun.device import process_memory_mb; "
        "b = open_bundle(sys.argv[1]); w, h = int(sys.argv[2]), int(sys.argv[3]); "
        "r = OrtRunner(b.model_path); r.__enter__(); "
        "run_bench(BenchJob(runner=r, manifest=b.manifest, warmup=5, iterations=20, frame_size=(w, h))); "
        "print(json.dumps(process_memory_mb()))"
    )
    peaks = {}
    for w, h in ((64, 48), (1920, 1080)):
        out = subprocess.run(
            [sys.executable, "-c", code, str(trained_run / "bundle"), str(w), str(h)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[w] = json.loads(out.stdout.strip().splitlines()[-1])[1]
    frames_mb = 4 * 1920 * 1080 * 3 / 2**20
    assert peaks[1920] - peaks[64] <= frames_mb * 1.5 + 16, peaks


# ----------------------------------------------------- 8. the catalogue of bad inputs: exit 2 and one clear line
def _shape_24(manifest):
    manifest["model"]["input_shape"] = [1, 3, 24, 24]
    manifest["preprocess"].update(crop=[24, 24], resize=max(24, manifest["preprocess"]["resize"]))


def _variant_bundles(trained_run, tmp_path):
    """Bundles whose manifest disagrees with their model: input shape, output name, class count."""
    from edgerun.bundle.manifest import write_manifest

    out = {}
    for name, change in (
        ("shape", _shape_24),  # self-consistent (crop 24), unlike the model's 16
        ("outname", lambda m: m["model"].__setitem__("output_name", "nope")),
        ("classes", lambda m: m.__setitem__("classes", ["a", "b", "c"])),
    ):
        folder = tmp_path / f"bad-{name}"
        shutil.copytree(trained_run / "bundle", folder)
        data = json.loads((folder / "manifest.json").read_text())
        change(data)
        write_manifest(str(folder), data)
        out[name] = str(folder)
    return out


BAD_INPUTS = [
    # (what, tool, arguments, exit code, words the message must hold)
    (
        "a boolean as a number",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "teacher.epochs=true"],
        2,
        "teacher.epochs: Value error, a number, not true",
    ),
    (
        "an infinite learning rate",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "teacher.lr=.inf"],
        2,
        "teacher.lr: Value error, a finite number",
    ),
    (
        "a zero std",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "data.std=[0,0.5,0.5]"],
        2,
        "every channel's std must be positive",
    ),
    (
        "an augmentation scale over 1",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "data.augment.scale=[0.5,1.5]"],
        2,
        "data.augment.scale",
    ),
    (
        "an absurd image size",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "data.image_size=100000"],
        2,
        "data.image_size: Input should be less than or equal to 4096",
    ),
    (
        "a model_kwargs typo",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "teacher.model_kwargs={{outpt_stride: 8}}"],
        2,
        "model_kwargs ['outpt_stride'] do not fit this model",
    ),
    (
        "an output that is a file",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "output={tmp}/afile"],
        2,
        "is a file: the run needs a folder",
    ),
    (
        "an output under a file",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "output={tmp}/afile/sub"],
        2,
        "afile' is a file); choose another output",
    ),
    (
        "a YAML alias",
        "edgedistill",
        ["teacher", "{recipe}", "--set", "teacher.model_kwargs={{a: &x [1], b: *x}}"],
        2,
        "YAML alias",
    ),
    (
        "one class",
        "edgedistill",
        [
            "teacher",
            "{recipe}",
            "--set",
            "data.source=folder",
            "--set",
            "data.root={one_class}",
            "--set",
            "data.train_per_class=null",
            "--set",
            "data.val_per_class=null",
        ],
        2,
        "a classifier needs at least two",
    ),
    (
        "pack -o inside the bundle",
        "edgedistill",
        ["pack", "{bundle}", "-o", "{bundle}/x.edb"],
        2,
        "inside the bundle folder",
    ),
    ("bench --iterations 0", "edgerun", ["bench", "{bundle}", "--iterations", "0"], 2, "must be at least 1"),
    (
        "--json into a missing folder",
        "edgerun",
        ["bench", "{bundle}", "--json", "{tmp}/missing/x.json"],
        2,
        "does not exist; create it first (nothing was run)",
    ),
    (
        "--csv into a missing folder",
        "edgerun",
        ["camera", "{bundle}", "--source", "x.mp4", "--csv", "{tmp}/no/f.csv"],
        2,
        "--csv",
    ),
    ("--batch 4 on a batch-1 model", "edgerun", ["bench", "{bundle}", "--batch", "4"], 2, "takes batches of 1"),
    (
        "--frame-size 100000x100000",
        "edgerun",
        ["bench", "{bundle}", "--frame-size", "100000x100000"],
        2,
        "at most 8192 pixels",
    ),
    ("--trust ''", "edgerun", ["verify", "{bundle}", "--trust", ""], 2, "--trust is empty"),
    ("a truncated .edb", "edgerun", ["verify", "{cut}"], 2, "truncated or damaged"),
    ("a manifest input shape unlike the model's", "edgerun", ["validate", "{shape}"], 2, "input shape [1, 3, 24, 24]"),
    ("a manifest output name unlike the model's", "edgerun", ["validate", "{outname}"], 2, "output 'nope'"),
    (
        "3 class names for 10 outputs",
        "edgerun",
        ["camera", "{classes}", "--source", "x.mp4"],
        2,
        "10 outputs and the manifest names 3",
    ),
]


@pytest.fixture(scope="module")
def bad_input_places(trained_run, tmp_path_factory):
    import yaml
    from conftest import FAST, deep_update

    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "afile").write_text("a file where a folder should be")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(deep_update(FAST, {"output": str(tmp / "run")})))
    one = tmp / "one-class"
    import cv2
    import numpy as np

    for split in ("train", "val"):
        (one / split / "only").mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(one / split / "only" / f"{i}.png"), np.full((16, 16), 40 * i, np.uint8))
    edb = pack_bundle(trained_run / "bundle", tmp / "student.edb")
    data = Path(edb).read_bytes()
    (tmp / "cut.edb").write_bytes(data[: len(data) // 2])
    places = {
        "recipe": str(recipe),
        "tmp": str(tmp),
        "bundle": str(trained_run / "bundle"),
        "one_class": str(one),
        "cut": str(tmp / "cut.edb"),
        **_variant_bundles(trained_run, tmp),
    }
    return places


@pytest.mark.parametrize("what,tool,args,code,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_every_bad_input_exits_2_with_one_clear_line(bad_input_places, capsys, what, tool, args, code, words):
    from edgedistill.cli import main as edgedistill_main

    argv = [a.format(**bad_input_places) for a in args]
    main = edgedistill_main if tool == "edgedistill" else edgerun_main
    try:
        exit_code = main(argv)
    except SystemExit as exc:  # argparse's own refusals exit 2 themselves
        exit_code = exc.code
    assert exit_code == code, what
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert words in " ".join(text.split()), text[-600:]
    assert "Traceback" not in text


def _broken_manifest(trained_run, tmp_path, name, change):
    """A copy of the bundle with its manifest.json changed by hand (not through write_manifest, which refuses)."""
    folder = tmp_path / name
    shutil.copytree(trained_run / "bundle", folder)
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return str(folder)


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("nhwc", lambda m: m["preprocess"].update(layout="NHWC"), "preprocess.layout is 'NHWC' but model.layout"),
        ("no-val", lambda m: m["samples"].pop("val"), "samples.val must name its file"),
        ("val-count", lambda m: m["samples"]["val"].update(count="20"), "samples.val.count must be a whole number"),
        ("shape-text", lambda m: m["model"].update(input_shape="1x3x16x16"), "four positive whole numbers"),
        ("digest", lambda m: m["files"].update({"model.onnx": 5}), "files['model.onnx'] must be a sha256"),
        ("class-ints", lambda m: m.update(classes=list(range(len(m["classes"])))), "'classes' must be names"),
    ],
)
def test_a_malformed_manifest_is_one_clear_error_in_every_command(trained_run, tmp_path, capsys, name, change, words):
    folder = _broken_manifest(trained_run, tmp_path, name, change)
    for command in (["validate", folder], ["bench", folder, "--iterations", "2"], ["verify", folder]):
        assert edgerun_main(command) == 2, command
        text = capsys.readouterr()
        assert words in text.err + text.out and "Traceback" not in text.err + text.out


def test_a_real_current_folder_is_refused_by_slot_activate_and_kept(tmp_path, capsys):
    version = "0123456789abcdef"
    release = tmp_path / "models" / "line" / version
    release.mkdir(parents=True)
    (release / "bundle.edb").write_bytes(b"x")
    current = tmp_path / "models" / "line" / "current"
    current.mkdir()
    (current / "notes.txt").write_text("someone's")
    assert edgerun_main(["slot", "activate", "line", version, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a real folder, not a link" in err and "mv" in err and "Traceback" not in err
    assert (current / "notes.txt").read_text() == "someone's"  # nothing lost


@pytest.mark.parametrize(
    "status, words",
    [
        ("[1, 2]", "is not a status record (a JSON object), but list"),
        ('{"fps": "fast"}', "'fps' is 'fast', not a number"),
        ('{"last_verdicts": [{"frame": "x"}]}', "'last_verdicts' is not a list"),
        ("\xff\xfe", "is not valid JSON"),
    ],
)
def test_a_malformed_status_file_is_one_clear_error(tmp_path, capsys, status, words):
    folder = tmp_path / "line"
    folder.mkdir()
    (folder / "status.json").write_bytes(status.encode("latin-1"))
    assert edgerun_main(["service", "status", "--name", "line", "--state-root", str(tmp_path)]) == 2
    text = capsys.readouterr()
    assert words in text.err and "Traceback" not in text.err
