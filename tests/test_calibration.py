"""The images that pick a threshold or calibrate INT8: decoded as the device decodes a camera frame (full frame,
its resize and crop), never in their training form, and apart from every image a model trained on or a figure
reports."""

import cv2
import numpy as np
import pytest
import torch

from edgedistill.data.folders import verify_and_cache
from edgedistill.data.images import eval_spec, read_image
from edgedistill.data.loaders import eval_loader
from edgedistill.data.sources import load_data
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig
from edgerun.preprocess import preprocess


def _folder(root, splits, size=(640, 480), per_class=4, seed=0):
    """Class folders of large noisy frames (larger than any training side, so a shrunk training form differs)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in ("good", "defect"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                frame = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                cv2.imwrite(str(folder / f"{split}-{cls}-{i}.png"), frame)
    return root


def _cfg(root, **extra):
    return DataConfig(root=str(root), image_size=32, crop_pct=0.875, cache=True, **extra)


def test_held_out_calibration_images_are_the_devices_pixels(tmp_path, monkeypatch):
    """data.calib_fraction's images, through the evaluation loader, equal edgerun's preprocessing of the files as
    they decode, to the last bit; their training form (shorter side shrunk) would not."""
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(_folder(tmp_path / "d", ("train", "val"), per_class=6), calib_fraction=0.34)
    data = load_data(cfg)
    calib, spec = data.calib, eval_spec(cfg)
    assert calib is not None and len(calib) == 4 and calib.prepared == spec and calib.max_side is None
    got = torch.cat([x for x, _ in eval_loader(calib, cfg)]).numpy()
    device = preprocess([read_image(p) for p in calib.paths], spec)
    assert np.array_equal(got, device)
    # what the held-out images were before: the training form, whose evaluation pixels are not the device's
    training_form = data.train.subset([0])
    assert training_form.max_side and training_form.load(0).shape[0] < 480
    shrunk = torch.cat([x for x, _ in eval_loader(training_form, cfg)]).numpy()
    assert not np.array_equal(shrunk, preprocess([read_image(training_form.paths[0])], spec))


def test_training_images_give_their_original_frame(tmp_path, monkeypatch):
    """Split.original of a training split is the file as it decodes (INT8 calibration reads it), not the shrunk
    form augmentation reads; an array without a file is its own original."""
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(_folder(tmp_path / "d", ("train", "val")))
    data = load_data(cfg)
    assert data.train.load(0).shape[:2] != (480, 640)
    assert np.array_equal(data.train.original(0), read_image(data.train.paths[0]))
    digits = load_data(DataConfig(source="digits", image_size=16, train_per_class=3, val_per_class=2))
    assert np.array_equal(digits.train.original(1), digits.train.load(1))


def test_the_bundles_int8_calibration_images_are_the_devices_pixels(tmp_path, monkeypatch):
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.outputs import ExportConfig
    from edgedistill.recipe.sections import ModelConfig
    from edgedistill.ship.export import ExportJob, build_bundle

    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(_folder(tmp_path / "d", ("train", "val")))
    data = load_data(cfg)
    (tmp_path / "ckpt").write_bytes(b"w")
    build_bundle(
        ExportJob(
            model=create_model(ModelConfig(model="mobilenetv3_small_050"), 2).eval(),
            out_dir=tmp_path / "bundle",
            name="calib",
            classes=data.classes,
            train=data.train,
            val=data.val,
            data_cfg=cfg,
            cfg=ExportConfig(int8="off", calib_samples=5, val_samples=4, parity_samples=4, deepstream=False),
            seed=0,
            checkpoint=tmp_path / "ckpt",
            source={},
            host_metrics={},
            recipe_yaml="name: calib\n",
        )
    )
    calib = np.load(tmp_path / "bundle" / "calib.npy")
    device = preprocess([read_image(p) for p in data.train.paths], eval_spec(cfg))
    assert len(calib) == 5
    assert all(any(np.array_equal(row, d) for d in device) for row in calib)


def test_a_calibration_folder_sharing_images_with_train_or_val_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "d", ("train", "val", "calib"), size=(64, 48))
    assert load_data(_cfg(root, calib_dir="calib")).calib is not None  # apart: accepted
    copy = root / "val" / "good" / "val-good-0.png"
    (root / "calib" / "good" / "copy-of-a-val-image.png").write_bytes(copy.read_bytes())
    with pytest.raises(DataError, match=r"data.calib_dir: 1 image\(s\) .* also in 'val/'"):
        load_data(_cfg(root, calib_dir="calib"))
    with pytest.raises(DataError, match="also in 'train/'"):
        load_data(_cfg(root, calib_dir="train"))


def test_verify_and_cache_of_an_evaluation_split_holds_the_crop(tmp_path, monkeypatch):
    """The evaluation form a held-out split takes: resized and cropped by the spec from the full frame."""
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    from edgedistill.data.folders import scan_folder_split

    cfg = _cfg(_folder(tmp_path / "d", ("val",), per_class=1))
    split = verify_and_cache(scan_folder_split(tmp_path / "d", "val", None, 0), True, prepared=eval_spec(cfg))
    assert split.load(0).shape == (32, 32, 3)


def _draws(point, positives, negatives, draws=4000, seed=0):
    """Share of simulated calibration draws (scores: positives N(1, 1), negatives N(-1, 1)) whose threshold keeps
    ``point``'s target on the true distributions (known here, so each draw is judged exactly)."""
    from scipy.stats import norm

    from edgedistill.judge.thresholds import pick_threshold

    rng = np.random.default_rng(seed)
    held = 0
    for _ in range(draws):
        scores = np.r_[rng.normal(1, 1, positives), rng.normal(-1, 1, negatives)]
        labels = np.r_[np.ones(positives, bool), np.zeros(negatives, bool)]
        t = pick_threshold(labels, scores, point)
        if point.target_recall is not None:
            held += norm.sf(t - 1) >= point.target_recall
        else:
            held += norm.sf(t + 1) <= point.max_false_reject
    return held / draws


@pytest.mark.parametrize(
    "target, positives, negatives",
    [({"target_recall": 0.9}, 60, 200), ({"target_recall": 0.95}, 120, 200), ({"max_false_reject": 0.02}, 50, 400)],
)
def test_the_confidence_bound_threshold_holds_on_new_images(target, positives, negatives):
    """With 95% confidence the target holds on the true distribution in >= 95% of calibration draws; the
    calibration images' own quantile (the point estimate it replaces) holds only about half the time."""
    from edgedistill.judge.thresholds import OperatingPoint

    assert _draws(OperatingPoint(**target, confidence=0.95), positives, negatives) >= 0.95
    assert _draws(OperatingPoint(**target), positives, negatives, draws=1000) < 0.7


def test_a_calibration_split_too_small_to_promise_says_so_with_the_images_needed():
    from edgedistill.judge.thresholds import OperatingPoint, pick_threshold, promise_text, threshold_promise

    labels = np.r_[np.ones(5, bool), np.zeros(300, bool)]  # 5 defects: a 0.95 recall cannot be promised
    scores = np.r_[np.linspace(0.6, 0.9, 5), np.linspace(0.0, 0.5, 300)]
    point = OperatingPoint(target_recall=0.95, confidence=0.95)
    promise = threshold_promise(labels, point)
    assert not promise["holds"] and promise["images"] == 5 and promise["images_needed"] == 59
    assert promise["achieved"] == pytest.approx(1 - 0.95**5)  # the most cautious threshold: every defect rejected
    assert pick_threshold(labels, scores, point) < 0.6  # ... which is the one picked
    text = promise_text(promise, "calib")
    assert "cannot be promised" in text and "59 are needed" in text and "23%" in text
    enough = threshold_promise(np.r_[np.ones(80, bool), np.zeros(300, bool)], point)
    assert enough["holds"] and enough["achieved"] >= 0.95 and "holds on new images" in promise_text(enough, "calib")
    limit = threshold_promise(labels, OperatingPoint(max_false_reject=0.02, confidence=0.95))
    assert limit["holds"] and limit["deciding"] == "negative" and limit["images_needed"] == 149
