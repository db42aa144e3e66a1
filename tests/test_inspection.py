"""Inspection end to end on real images: an imbalanced good/defect folder (digits 0-4 are good parts, 7 the defect),
judged on balanced accuracy, the threshold picked on val/ for a target recall and reported on test/, carried in the
bundle to `edgerun validate` and to `edgerun camera --reject-class defect` on a real video."""

import csv
import json

import cv2
import numpy as np
import pytest
import yaml
from conftest import FAST, deep_update, digits_arrays

from edgedistill.cli import main
from edgerun.bundle.bundle import open_bundle
from edgerun.cli import main as edgerun_main
from edgerun.preprocess import to_three_channels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    images, labels = digits_arrays()
    good = np.flatnonzero(labels <= 4)
    defect = np.flatnonzero(labels == 7)
    rng = np.random.default_rng(0)
    good, defect = rng.permutation(good), rng.permutation(defect)
    sizes = {"train": (100, 25), "val": (60, 15), "test": (60, 15)}  # 4:1, like a line's reject rate
    start = {"good": 0, "defect": 0}
    for split, (n_good, n_defect) in sizes.items():
        for name, pool, n in (("good", good, n_good), ("defect", defect, n_defect)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in pool[start[name] : start[name] + n]:
                cv2.imwrite(str(folder / f"{i}.png"), cv2.resize(images[i], (16, 16), interpolation=cv2.INTER_NEAREST))
            start[name] += n
    return root


@pytest.fixture(scope="module")
def inspection_run(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspection")
    recipe = deep_update(
        FAST,
        {
            "name": "parts",
            "output": str(folder / "run"),
            "data": {
                "source": "folder",
                "root": str(parts),
                "test_dir": "test",
                "train_per_class": None,
                "val_per_class": None,
            },
            "teacher": {"epochs": 4, "logit_adjustment": 1.0},
            "student": {"epochs": 4, "logit_adjustment": 1.0},
            "evaluate": {"operating_point": {"target_recall": 0.9}},
            "export": {"target": "jetson-nano-jp4", "val_samples": 75},
        },
    )
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    return folder / "run", path


def test_the_run_is_judged_on_balanced_accuracy_with_the_defect_threshold_picked_on_val(inspection_run):
    run, _ = inspection_run
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"]["name"] == "balanced_accuracy" and "4.0x" in s["metric"]["reason"]
    assert s["metric"]["positive_class"] == "defect" and "minority" in s["metric"]["positive_reason"]
    assert s["eval_split"] == "test" and s["metric"]["calibration"] == {"split": "val", "images": 75, "positives": 15}
    assert s["kd_gain"] == pytest.approx(s["student"]["balanced_accuracy"] - s["baseline"]["balanced_accuracy"])
    assert s["retention"] == pytest.approx(s["student"]["balanced_accuracy"] / s["teacher"]["balanced_accuracy"])
    assert s["significance"]["test"] == "permutation"
    op = s["operating_point"]
    for role in ("teacher", "student", "baseline"):
        assert op[role]["calibration"]["recall"] >= 0.9  # the rule holds where the threshold was picked
        assert op[role]["positives"] == 15 and op[role]["negatives"] == 60  # ... and it is reported on test/
        lo, hi = op[role]["recall_interval"]
        assert lo <= op[role]["recall"] <= hi
        assert 0 <= s[role]["roc_auc"] <= 1 and s[role]["pr_auc"] is not None
    assert s["top1_kd_gain"] == pytest.approx(s["student"]["top1"] - s["baseline"]["top1"])
    per = s["student"]["per_class"]  # on test/, with precision/recall/F1 for every model
    assert per["defect"]["support"] == 15 and per["good"]["support"] == 60
    assert s["student"]["balanced_accuracy"] == pytest.approx((per["defect"]["recall"] + per["good"]["recall"]) / 2)
    lo, hi = s["student"]["balanced_accuracy_interval"]
    assert lo <= s["student"]["balanced_accuracy"] <= hi
    md = (run / "summary.md").read_text()
    assert (
        "judged on balanced accuracy" in md and "operating point recall >= 0.9" in md and "| balanced accuracy |" in md
    )
    # 15 defects in val/ cannot promise a 0.9 recall with 95% confidence (29 are needed): said, with the number
    promise = op["promise"]
    assert promise["images"] == 15 and not promise["holds"] and promise["images_needed"] == 29
    assert "WARNING: recall >= 0.9 with 95% confidence cannot be promised" in md and "29 are needed" in md
    # the verdict is judged where the line operates: at recall >= 0.9 (each model at its own threshold), the good
    # parts each model throws away, paired on the 60 good images of test/
    cmp = op["comparison"]
    assert cmp["measure"] == "false_reject" and cmp["matched"] == "recall"
    assert cmp["student"] == op["student"]["false_reject"] and cmp["baseline"] == op["baseline"]["false_reject"]
    assert cmp["gain"] == pytest.approx(op["baseline"]["false_reject"] - op["student"]["false_reject"])
    assert cmp["significance"]["images"] == 60 and cmp["significance"]["test"] == "mcnemar"
    thrown = round(op["student"]["false_reject"] * 60), round(op["baseline"]["false_reject"] * 60)
    assert cmp["significance"]["b_only"] - cmp["significance"]["a_only"] == thrown[0] - thrown[1]
    lo, hi = cmp["gain_interval"]
    assert lo <= hi
    assert "false-reject rate saved at matched recall (recall >= 0.9 with 95% confidence)" in s["verdict"]
    assert "on 60 negative images" in s["verdict"] and "where the line operates, student against baseline" in md
    # at 16 px per-kernel costs dominate: the planner cannot tell student and teacher apart on the Nano (their
    # intervals overlap), and the verdict says exactly that, never "not deployable"
    assert s["device_check"]["verdict"] == "within error" and not s["device_check"]["student_faster"]
    assert "within the planner's error" in s["verdict"] and "Jetson Nano" in s["verdict"]
    assert "NOT DEPLOYABLE" not in s["verdict"]
    html = (run / "report.html").read_text()
    assert "ROC and precision-recall curves of the positive class (defect)" in html
    assert "Operating point: recall &gt;= 0.9" in html and "precision / recall / F1" in html
    assert "Student against baseline at matched recall: false-reject" in html
    teacher = json.loads((run / "teacher" / "report.json").read_text())
    assert teacher["metric"] == "balanced_accuracy" and teacher["per_class_metrics"]["defect"]["support"] == 15


def test_the_bundle_carries_the_threshold_and_validate_checks_recall_there(inspection_run, tmp_path):
    run, _ = inspection_run
    s = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    decision = manifest["decision"]
    assert decision["positive_class"] == "defect" and decision["metric"] == "balanced_accuracy"
    assert decision["threshold"] == pytest.approx(s["operating_point"]["student"]["threshold"])
    assert decision["operating_point"]["target_recall"] == 0.9 and decision["calibration_split"] == "val"
    int8 = manifest["metrics"]["int8"]
    assert 0 <= int8["fp32_recall"] <= 1 and "recall" in int8["int8"]
    # the bundle's check images and the INT8 gate's come from test/, which chose nothing, apart; val/ picked the
    # thresholds: FP32's and, by the same rule on the same images, the INT8 model's own
    samples = manifest["samples"]["val"]
    assert samples["split"] == "test" and samples["count"] + samples["gate_images"] <= 75
    assert decision["thresholds"]["fp32"] == decision["threshold"]
    line = int8["line"]
    assert decision["thresholds"]["int8"] == pytest.approx(line["threshold"]) and line["margin"] == 0.01
    assert int8["status"] == ("accepted" if line["passes"] else "rejected")
    for attempt in int8["attempts"].values():  # every attempt judged at its own threshold, top-1 a column
        assert attempt["passes"] == attempt["line"]["passes"] and "top1" in attempt
        assert attempt["line"]["positives"] + attempt["line"]["negatives"] == samples["gate_images"]
    assert "non-inferiority gate on recall and false-reject" in int8["advice"]
    report = tmp_path / "validate.json"
    assert edgerun_main(["validate", str(run / "bundle"), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["decision"]["recall"] == pytest.approx(int8["fp32_recall"])  # same images, same runtime
    assert got["decision"]["false_reject"] == pytest.approx(int8["fp32_false_reject"])
    _, labels = open_bundle(run / "bundle").validation()
    assert got["decision"]["positives"] == int((labels == 0).sum()) > 0 and got["status"] == "PASS"
    assert (
        edgerun_main(["validate", str(run / "bundle"), "--variant", "int8", "--max-drop", "1.0", "--json", str(report)])
        == 0
    )
    got = json.loads(report.read_text())["decision"]
    assert got["threshold"] == pytest.approx(decision["thresholds"]["int8"])  # the INT8 model's own
    assert got["recall"] == pytest.approx(int8["int8"]["recall"]) and int8["int8"]["threshold"] == got["threshold"]


def test_camera_rejects_at_the_manifest_threshold_on_a_real_video(inspection_run, tmp_path, capsys):
    run, _ = inspection_run
    bundle = open_bundle(run / "bundle")
    images, labels = bundle.validation()
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    for image in images:
        writer.write(
            cv2.cvtColor(
                to_three_channels(cv2.resize(image, (64, 64), interpolation=cv2.INTER_NEAREST)), cv2.COLOR_RGB2BGR
            )
        )
    writer.release()
    threshold = bundle.manifest.decision["threshold"]
    rows_path, summary_path = tmp_path / "frames.csv", tmp_path / "camera.json"
    assert (
        edgerun_main(
            [
                "camera",
                str(run / "bundle"),
                "--source",
                str(video),
                "--reject-class",
                "defect",
                "--csv",
                str(rows_path),
                "--json",
                str(summary_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"reject rule: P(defect) >= {threshold:.4f} (the bundle's operating point (recall >= 0.9" in out
    summary = json.loads(summary_path.read_text())
    assert summary["reject_threshold"] == pytest.approx(threshold) and summary["frames_processed"] == len(images)
    with open(rows_path) as fh:
        rows = list(csv.DictReader(fh))
    assert "score_defect" in rows[0]
    scores = np.array([float(r["score_defect"]) for r in rows])
    rejected = np.array([r["reject"] == "1" for r in rows])
    assert np.array_equal(rejected, scores >= threshold) and summary["rejects"] == int(rejected.sum())
    assert 0 < rejected.sum() < len(rows)  # the threshold sorts the parts, it does not reject all or none
    # --threshold overrides the manifest's
    assert (
        edgerun_main(
            [
                "camera",
                str(run / "bundle"),
                "--source",
                str(video),
                "--reject-class",
                "defect",
                "--threshold",
                "0",
                "--json",
                str(summary_path),
            ]
        )
        == 0
    )
    assert json.loads(summary_path.read_text())["rejects"] == len(images)


def test_top1_on_imbalanced_data_is_warned_about_before_training(inspection_run):
    run, recipe = inspection_run
    assert main(["evaluate", str(recipe), "--set", "evaluate.metric=top1"]) == 0
    log = (run / "run.log").read_text()
    assert "imbalanced 4.0:1" in log and "evaluate.metric is top1" in log
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"]["name"] == "top1" and s["significance"]["test"] == "mcnemar"
