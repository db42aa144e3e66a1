"""Export to a bundle: ONNX parity, opsets per target, operator checks, host INT8, manifest, pack/unpack."""

import io
import json
import tarfile

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgedistill.cli import main
from edgedistill.data.sources import load_data
from edgedistill.errors import ExportError
from edgedistill.models.factory import create_model
from edgedistill.recipe.outputs import ExportConfig
from edgedistill.recipe.sections import DataConfig, ModelConfig
from edgedistill.ship.export import ExportJob, build_bundle
from edgerun.bundle.bundle import open_bundle
from edgerun.bundle.manifest import SCHEMA_VERSION, load_manifest
from edgerun.errors import BundleError, UnsafeArchiveError
from edgerun.preprocess import preprocess
from edgerun.runtime.runners import OrtRunner

DATA_CFG = DataConfig(
    source="digits", image_size=32, train_per_class=20, val_per_class=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)


@pytest.fixture(scope="module")
def digits():
    return load_data(DATA_CFG)


def _bundle(tmp_path, model, digits, **export):
    cfg = ExportConfig(**dict(dict(calib_samples=32, val_samples=40, parity_samples=40, int8=False), **export))
    tmp_path.mkdir(parents=True, exist_ok=True)
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_bytes(b"weights")
    return build_bundle(
        ExportJob(
            model=model,
            out_dir=tmp_path / "bundle",
            name="t",
            classes=digits.classes,
            train=digits.train,
            val=digits.val,
            data_cfg=DATA_CFG,
            cfg=cfg,
            seed=0,
            checkpoint=ckpt,
            source={"student_model": "x"},
            host_metrics={},
            recipe_yaml="name: t\n",
        )
    )


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "squeezenet1_1"])
def test_export_with_parity_timm_and_torchvision(tmp_path, digits, name):
    torch.manual_seed(0)
    model = create_model(ModelConfig(model=name), num_classes=10).eval()
    manifest = _bundle(tmp_path, model, digits)
    par = manifest["metrics"]["parity"]
    assert par["max_abs_error"] < 1e-3 and par["top1_agreement"] == 1.0 and par["samples"] == 40
    assert manifest["model"]["input_name"] == "input" and manifest["model"]["input_shape"] == [1, 3, 32, 32]
    assert manifest["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    bundle = open_bundle(tmp_path / "bundle")
    images, labels = bundle.validation()
    assert images.dtype == np.uint8 and len(images) == len(labels) == 40
    calib = bundle.calibration()
    assert calib.shape == (32, 3, 32, 32) and calib.dtype == np.float32


def test_opset_follows_the_target_and_dynamic_batch_is_recorded(tmp_path, digits):
    model = create_model(ModelConfig(model="mobilenetv3_small_050"), num_classes=10).eval()
    nano = _bundle(tmp_path / "a", model, digits, target="jetson-nano-jp4")
    assert nano["model"]["opset"] == 13
    assert onnx.load(str(tmp_path / "a" / "bundle" / "model.onnx")).opset_import[0].version == 13
    orin = _bundle(
        tmp_path / "b", model, digits, target="jetson-orin-nano-jp6", dynamic_batch=True, batch=4, max_batch=8
    )
    assert orin["model"]["opset"] == 17 and orin["model"]["dynamic_batch"] == {"min": 1, "opt": 4, "max": 8}
    with OrtRunner(tmp_path / "b" / "bundle" / "model.onnx") as runner:
        assert runner.infer({"input": np.zeros((3, 3, 32, 32), np.float32)})["logits"].shape == (3, 10)
    from edgedistill.errors import RecipeError

    with pytest.raises(RecipeError, match="at most 13"):
        _bundle(tmp_path / "c", model, digits, target="jetson-nano-jp4", opset=17)


class WithNonZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        pooled = x.mean((2, 3))
        count = torch.nonzero(pooled > 0).shape[0]
        return self.fc(pooled) + count


def test_unsupported_operator_names_operator_and_node_and_writes_nothing(tmp_path, digits):
    with pytest.raises(ExportError, match=r"node '.*NonZero.*' \(NonZero\).*TensorRT 8.2.*supported from TensorRT 8.5"):
        _bundle(tmp_path, WithNonZero().eval(), digits, target="jetson-nano-jp4")
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


def test_parity_failure_is_a_clear_error(tmp_path, digits):
    class Noisy(nn.Module):  # differs between PyTorch and its traced ONNX graph
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x.mean((2, 3))) + (0.0 if self.calls == 1 else 1.0)

    with pytest.raises(ExportError, match="parity_atol"):
        _bundle(tmp_path, Noisy().eval(), digits, simplify=False)
    assert not (tmp_path / "bundle").exists()


def test_trained_bundle_has_int8_accuracy_and_host_metrics(trained_run):
    bundle = open_bundle(trained_run / "bundle")
    m = bundle.manifest.data
    int8 = m["metrics"]["int8"]
    assert 0.4 < int8["fp32_top1"] <= 1.0  # a trained student on real digits (chance: 0.1)
    assert 0 <= int8["int8"]["top1"] <= 1 and int8["int8"]["status"] in ("accepted", "rejected")
    # the gate chooses on its own images; the bundle's check images (val.npz) chose nothing
    gate = int8["int8"]["gate"]
    assert int8["int8"]["drop"] == pytest.approx(int8["fp32_gate"]["top1"] - gate["top1"])
    assert int8["int8"]["images"] == "check" and m["samples"]["val"]["chose"].startswith("nothing")
    assert m["samples"]["val"]["count"] == len(bundle.validation()[1]) and m["samples"]["val"]["gate_images"] > 0
    variant = m["variants"]["int8"]
    assert variant["file"] == "model.int8.onnx" and "int8_trt" not in m["variants"]  # one model for every TensorRT
    assert variant["explicit_quantization"] and variant["method"] in ("ptq", "partial", "qad", "qad+partial")
    from edgedistill.ship.qdq import qdq_violations

    assert qdq_violations(onnx.load(str(trained_run / "bundle" / "model.int8.onnx"))) == []  # TensorRT 8.2 takes it
    assert int8["attempts"]["ptq"]["drop"] == pytest.approx(int8["fp32_gate"]["top1"] - int8["attempts"]["ptq"]["top1"])
    assert m["metrics"]["host"]["student_top1"] > 0 and "retention" in m["metrics"]["host"]
    assert len(m["source"]["checkpoint_sha256"]) == 64 and m["versions"]["torch"]
    assert set(m["files"]) >= {"model.onnx", "calib.npy", "val.npz", "recipe.yaml", "model.int8.onnx"}
    # the device pipeline (raw uint8 -> preprocess -> ORT) reproduces the host's FP32 accuracy figure
    images, labels = bundle.validation()
    with OrtRunner(bundle.model_path) as runner:
        logits = np.concatenate(
            [
                runner.infer({"input": preprocess(images[i : i + 1], bundle.manifest.preprocess)})["logits"]
                for i in range(len(images))
            ]
        )
    assert float((logits.argmax(1) == labels).mean()) == pytest.approx(int8["fp32_top1"])


def test_rejected_int8_is_marked_not_fatal(tmp_path, digits, monkeypatch):
    import edgedistill.ship.export as export

    real = export.quality
    fp32: dict = {}

    def worse_int8(path, *args, **kwargs):  # every INT8 attempt 2 points under FP32 on the gate's images (1-point gate)
        got = real(path, *args, **kwargs)
        if "int8" not in path.name:
            fp32.update(got)  # the last FP32 figures are the gate's (measured just before the attempts)
            return got
        return {k: fp32[k] - 0.02 for k in got}

    monkeypatch.setattr(export, "quality", worse_int8)
    torch.manual_seed(0)
    model = create_model(ModelConfig(model="mobilenetv3_small_050"), num_classes=10).eval()
    m = _bundle(tmp_path, model, digits, int8=True, int8_max_drop=0.01, int8_keep_budget=3, target="jetson-nano-jp4")
    assert m["variants"]["int8"]["status"] == "rejected" and m["variants"]["int8"]["drop"] > 0.01
    assert m["variants"]["int8"]["symmetric"] is True and m["variants"]["int8"]["explicit_quantization"]
    int8 = m["metrics"]["int8"]
    assert set(int8["attempts"]) == {"ptq", "partial"}  # build_bundle alone has no QAD: the export stage gives it
    assert len(int8["attempts"]["partial"]["kept_fp16"]) <= 3 and len(int8["sensitivity"]) == int8["layers"]
    assert sum(r["kept"] for r in int8["sensitivity"]) == len(int8["attempts"]["partial"]["kept_fp16"])
    assert int8["advice"].startswith("INT8 rejected: PTQ (minmax): drop") and "--set export.int8=qad" in int8["advice"]
    qdq = onnx.load(str(tmp_path / "bundle" / "model.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qdq.graph.node}
    assert not list((tmp_path / "bundle").glob(".int8-*"))  # the attempts are not left in the bundle


def test_tampered_file_fails_its_sha256_check(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(trained_run / "bundle", copy)
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01")
    with pytest.raises(BundleError, match="'model.onnx' fails its sha256 check"):
        open_bundle(copy)
    (copy / "val.npz").unlink()
    with pytest.raises(BundleError, match="'model.onnx'|'val.npz'"):
        open_bundle(copy)


def test_pack_and_unpack_round_trip(trained_run, tmp_path, capsys):
    out = tmp_path / "student.edb"
    assert main(["pack", str(trained_run / "bundle"), "-o", str(out)]) == 0
    bundle = open_bundle(out, workdir=tmp_path / "unpacked")
    assert bundle.manifest.data == load_manifest(trained_run / "bundle" / "manifest.json").data


def _tar(path, add):
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink", "device"])
def test_malicious_archives_are_refused(tmp_path, kind):
    def add(tar):
        info = tarfile.TarInfo({"traversal": "../../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "evil"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if info.size else None)

    archive = _tar(tmp_path / f"{kind}.edb", add)
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        open_bundle(archive, workdir=tmp_path / "work")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / kind).exists()


def test_manifest_round_trip_and_newer_schema(trained_run, tmp_path):
    data = json.loads((trained_run / "bundle" / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(dict(data, schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(BundleError, match="newer than this edgerun.*upgrade"):
        load_manifest(path)
    broken = dict(data)
    del broken["preprocess"]
    path.write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="'preprocess' is missing"):
        load_manifest(path)
    path.write_text(json.dumps(dict(data, preprocess=dict(data["preprocess"], interpolation="lanczos9"))))
    with pytest.raises(BundleError, match="interpolation"):
        load_manifest(path)
