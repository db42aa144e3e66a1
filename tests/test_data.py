import gzip
import io
import struct
import tarfile

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from edgedistill.data.folders import resolve_root
from edgedistill.data.images import eval_spec
from edgedistill.data.sources import load_data, read_idx
from edgedistill.errors import DataError
from edgedistill.recipe.sections import DataConfig
from edgerun.errors import UnsafeArchiveError
from edgerun.preprocess import preprocess


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_folder_source_reads_grayscale_png_and_jpeg_as_rgb(digits_folder):
    data = load_data(DataConfig(root=str(digits_folder), image_size=16))
    assert data.classes == [f"digit{i}" for i in range(10)]
    assert len(data.train) == 250 and len(data.val) == 80
    image = data.train.load(0)
    assert image.dtype == np.uint8 and image.shape == (24, 24, 3)


def test_corrupt_images_are_skipped_counted_and_listed(digits_folder, tmp_path):
    root = _copy_tree(digits_folder, tmp_path / "d")
    (root / "train" / "digit3" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "digit4" / "empty.png").write_bytes(b"")
    data = load_data(DataConfig(root=str(root)))
    assert len(data.train) == 250
    assert sorted(p.rsplit("/", 1)[-1] for p in data.train.skipped) == ["broken.jpg", "empty.png"]


def test_empty_class_folder_stops_before_training(digits_folder, tmp_path):
    root = _copy_tree(digits_folder, tmp_path / "d")
    (root / "train" / "digit10").mkdir()
    with pytest.raises(DataError, match="digit10.*holds no images"):
        load_data(DataConfig(root=str(root)))


def test_val_classes_must_match_train(digits_folder, tmp_path):
    root = _copy_tree(digits_folder, tmp_path / "d")
    (root / "val" / "digit9").rename(root / "val" / "digit_nine")
    with pytest.raises(DataError, match=r"only in train: \['digit9'\], only in val: \['digit_nine'\]"):
        load_data(DataConfig(root=str(root)))


def test_missing_val_folder_says_what_exists(digits_folder, tmp_path):
    root = _copy_tree(digits_folder, tmp_path / "d")
    (root / "val").rename(root / "test")
    with pytest.raises(DataError, match=r"found: \['test', 'train'\].*data.val_dir"):
        load_data(DataConfig(root=str(root)))
    assert len(load_data(DataConfig(root=str(root), val_dir="test")).val) == 80


def test_missing_root_and_unset_root():
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(root="/nonexistent/data"))
    with pytest.raises(DataError, match="data.root is not set"):
        load_data(DataConfig())


def test_archive_root_is_unpacked_once_and_traversal_refused(digits_folder, tmp_path):
    archive = tmp_path / "digits.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(digits_folder, arcname="digits")
    root = resolve_root(archive, cache_dir=tmp_path / "cache")
    assert root.name == "digits" and (root / "train" / "digit0").is_dir()
    assert resolve_root(archive, cache_dir=tmp_path / "cache") == root
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UnsafeArchiveError, match=r"\.\./escape.txt"):
        resolve_root(evil, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "escape.txt").exists()


def test_digits_source_is_stratified_and_fixed():
    data = load_data(DataConfig(source="digits"))
    assert len(data.train) + len(data.val) == 1797
    assert set(np.unique(data.val.labels)) == set(range(10))
    again = load_data(DataConfig(source="digits"))
    assert np.array_equal(data.val.labels, again.val.labels)


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_source(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_data(DataConfig(source="idx", root=str(tmp_path)))
    assert len(data.train) == 40 and len(data.val) == 20 and data.classes[0] == "t-shirt"
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_data(DataConfig(source="idx", root=str(tmp_path)))


def test_real_fashion_mnist_when_installed():
    import glob

    hits = glob.glob("/usr/share/**/train-images-idx3-ubyte*", recursive=True)
    if not hits:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    import os

    data = load_data(DataConfig(source="idx", root=os.path.dirname(hits[0]), train_per_class=5, val_per_class=5))
    assert len(data.train) == 50 and data.train.load(0).shape == (28, 28)


def test_eval_preprocessing_equals_albumentations_pipeline():
    """The device's preprocess() is the same transform as albumentations' resize + centre crop + normalize."""
    cfg = DataConfig(image_size=24, crop_pct=0.75, interpolation="bilinear")
    spec = eval_spec(cfg)
    assert spec.resize == 32 and spec.crop == (24, 24)
    image = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    ours = preprocess([image], spec)[0]
    ref = A.Compose(
        [
            A.SmallestMaxSize(max_size=32, interpolation=cv2.INTER_LINEAR),
            A.CenterCrop(24, 24),
            A.Normalize(mean=cfg.mean, std=cfg.std),
        ]
    )(image=image)["image"].transpose(2, 0, 1)
    assert ours.shape == (3, 24, 24)
    assert np.abs(ours - ref).max() < 0.05  # equal up to one grey level of resampling rounding


def test_training_images_are_held_at_the_resolution_augmentation_needs(tmp_path):
    """Large training images are shrunk once at decoding (to what random-resized-crop's smallest crop needs);
    validation images keep full resolution, as the device sees its frames; lazy loading shrinks the same way."""
    import math

    import cv2
    import numpy as np

    from edgedistill.data.images import fit_shorter_side, read_image, training_side
    from edgedistill.data.sources import load_data
    from edgedistill.recipe.sections import DataConfig

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(tmp_path / split / cls / f"{i}.png"), rng.integers(0, 255, (300, 400, 3), np.uint8))
    cfg = DataConfig(root=str(tmp_path), image_size=32, augment={"scale": [0.35, 1.0], "ratio": [0.75, 1.3333]})
    side = training_side(cfg)
    assert side == math.ceil(32 * math.sqrt(1.3333 / 0.35))  # 63: the smallest, widest crop still covers 32 px
    data = load_data(cfg)
    for i in range(len(data.train)):
        held = data.train.load(i)
        direct = cv2.resize(read_image(data.train.paths[i]), (84, 63), interpolation=cv2.INTER_AREA)
        assert held.shape == (63, 84, 3) and np.array_equal(held, direct)  # the same pixels as decoding directly
    assert all(data.val.load(i).shape == (32, 32, 3) for i in range(len(data.val)))  # held as evaluation crops
    assert all(data.val.original(i).shape == (300, 400, 3) for i in range(len(data.val)))  # the files, for bundles
    lazy = load_data(cfg.model_copy(update={"cache": False}))
    assert np.array_equal(lazy.train.load(0), data.train.load(0))
    small = rng.integers(0, 255, (40, 50, 3), np.uint8)
    assert fit_shorter_side(small, side) is small  # never enlarged


def test_importing_the_data_path_never_reaches_the_network():
    """albumentations looks its version up on PyPI at import unless told not to; edgedistill tells it."""
    import subprocess
    import sys

    code = (
        "import os, socket\n"
        "calls = []\n"
        "socket.getaddrinfo = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError('offline'))\n"
        "os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None)\n"
        "import edgedistill.data.loaders\n"
        "print(len(calls), os.environ['NO_ALBUMENTATIONS_UPDATE'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1"]


def test_decoded_images_are_kept_on_disk_and_a_changed_image_is_decoded_again(tmp_path, monkeypatch):
    """Hit: a second load reads the memory-mapped entries (training and evaluation images) without decoding; miss:
    one changed file gives a new entry; both hold the same pixels as decoding directly; bundles still get the
    evaluation images as their files hold them."""
    import cv2
    import numpy as np

    from edgedistill.data import folders, imagecache, splits
    from edgedistill.data.images import eval_spec, read_image
    from edgedistill.data.loaders import eval_loader
    from edgedistill.data.sources import load_data
    from edgedistill.recipe.sections import DataConfig
    from edgedistill.ship.export import raw_validation_images
    from edgerun.preprocess import preprocess

    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(2):
                cv2.imwrite(
                    str(tmp_path / "d" / split / cls / f"{i}.png"), rng.integers(0, 255, (90, 120, 3), np.uint8)
                )
    (tmp_path / "d" / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    cfg = DataConfig(
        root=str(tmp_path / "d"), image_size=16, crop_pct=0.875, augment={"scale": [0.5, 1.0], "ratio": [1.0, 1.0]}
    )
    first = load_data(cfg)
    assert len(first.train) == 4 and first.train.skipped and "broken.jpg" in first.train.skipped[0]
    entries = sorted((tmp_path / "cache" / "decoded").glob("*.index.npy"))
    assert len(entries) == 2  # training and validation images
    spec = eval_spec(cfg)
    originals = [read_image(p) for p in first.val.paths]
    batch = torch.cat([x for x, _ in eval_loader(first.val, cfg)]).numpy()
    assert np.array_equal(batch, preprocess(originals, spec))  # the evaluation pixels of direct decoding
    assert first.val.load(0).shape[:2] == (16, 16)
    assert np.array_equal(raw_validation_images(first.val, np.arange(4), spec), np.stack(originals))
    side = first.train.max_side
    for i in range(4):
        direct = read_image(first.train.paths[i])
        h, w = direct.shape[:2]
        expected = cv2.resize(direct, (round(w * side / h), side), interpolation=cv2.INTER_AREA)
        assert np.array_equal(first.train.load(i), expected)

    calls = []
    real_read = folders.read_image
    for module in (folders, splits):  # the decoders that fill the cache and that read a lazy split
        monkeypatch.setattr(module, "read_image", lambda *a, **k: calls.append(a[0]) or real_read(*a, **k))
    second = load_data(cfg)
    assert not calls  # both splits came from their entries, undecoded
    assert all(np.array_equal(a, b) for a, b in zip(first.train.images, second.train.images))
    assert isinstance(second.train.images[0].base, np.memmap) or not second.train.images[0].flags.writeable

    cv2.imwrite(str(first.train.paths[0]), rng.integers(0, 255, (90, 120, 3), np.uint8))  # one image changes
    calls.clear()
    third = load_data(cfg)
    assert [c for c in calls if "/d/train/" in str(c)]  # decoded again ...
    assert len(sorted((tmp_path / "cache" / "decoded").glob("*.index.npy"))) == 3  # ... into a new entry
    assert not np.array_equal(third.train.load(0), first.train.load(0))
    assert imagecache.entry_key(first.train.paths, "a") != imagecache.entry_key(first.train.paths, "b")
