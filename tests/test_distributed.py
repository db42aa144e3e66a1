"""Several processes, one training: the sampler's shards, order-free augmentation, and torchrun end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import FAST, TORCHRUN, deep_update, kill_when_written

from edgedistill.data.loaders import EpochBatchSampler, TrainDataset, batch_sizes, train_loader
from edgedistill.data.sources import load_data
from edgedistill.errors import DataError
from edgedistill.recipe.loading import load_recipe
from edgedistill.recipe.sections import DataConfig


@pytest.mark.parametrize("count,batch,world", [(103, 8, 2), (103, 9, 3), (7, 16, 2)])
def test_ranks_together_see_the_one_process_batches(count, batch, world):
    one = EpochBatchSampler(count, batch, seed=4)
    ranks = [EpochBatchSampler(count, batch, seed=4, rank=r, world=world) for r in range(world)]
    for sampler in [one, *ranks]:
        sampler.set_epoch(2)
    single = list(one)
    shards = [list(r) for r in ranks]
    assert all(len(s) == len(single) for s in shards)
    for i, batch_pairs in enumerate(single):
        together = sorted(pair for shard in shards for pair in shard[i])
        assert together == sorted(batch_pairs)
    one.set_epoch(3)
    assert list(one) != single  # a new epoch, a new shuffle


def test_too_few_images_for_the_processes_and_uneven_batches_are_refused():
    with pytest.raises(DataError, match="processes"):
        EpochBatchSampler(1, 4, seed=0, world=2)
    with pytest.raises(DataError, match="data.batch_per_device"):
        batch_sizes(DataConfig(batch_size=30), world=4)
    assert batch_sizes(DataConfig(batch_size=30, batch_per_device=8), world=4) == (32, 8)


def test_an_images_augmentation_does_not_depend_on_order_or_worker(tmp_path):
    cfg = DataConfig(source="digits", image_size=16, train_per_class=5, batch_size=8, workers=0)
    data = load_data(cfg, seed=0)
    dataset = TrainDataset(data.train, cfg)
    first = dataset[(3, 77)][0]
    for other in (0, 5, 9):
        dataset[(other, 77)]
    assert torch.equal(dataset[(3, 77)][0], first)
    assert not torch.equal(dataset[(3, 78)][0], first)  # another epoch: another view
    in_process = [x for x, _ in train_loader(data.train, cfg, seed=1, epoch=2)]
    workers = [x for x, _ in train_loader(data.train, cfg.model_copy(update={"workers": 2}), seed=1, epoch=2)]
    assert len(in_process) == len(workers) > 1
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers))


def test_workers_auto_and_hardware_keys_stay_out_of_fingerprints(make_recipe):
    auto = load_recipe(make_recipe())
    assert auto.data.workers == "auto"
    fixed = load_recipe(make_recipe({"data": {"workers": 3}}))
    assert auto.fingerprint("data") == fixed.fingerprint("data")
    per_device = load_recipe(make_recipe({"data": {"batch_per_device": 16}}))
    assert per_device.fingerprint("data") != auto.fingerprint("data")  # it changes the global batch


def _steps(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"kind": "step"' in line]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_after_a_kill(tmp_path):
    """Two gloo processes on CPU, each with half of every global batch, take the same steps as one process (a
    BatchNorm-free model, since gloo has no SyncBatchNorm); killed after the teacher's first checkpoint and
    launched again, they resume and still match, through the teacher and the distill stage. The draws are
    class-balanced (data.sampler: balanced, with replacement) and the KD term is Balanced KD (distill.balance:
    reweight), so those paths run under DistributedDataParallel too."""
    base = deep_update(
        FAST,
        {
            "data": {"image_size": 32, "train_per_class": 24, "val_per_class": 6, "workers": 0, "sampler": "balanced"},
            "distill": {"balance": "reweight"},
            "teacher": {"model": "convnext_atto", "epochs": 3, "lr": 0.002, "val_every": 1},
            "student": {"model": "convnext_atto", "epochs": 1, "lr": 0.002},
        },
    )
    recipes = {}
    for name in ("one", "two"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(deep_update(base, {"output": str(tmp_path / name)})))
    args = ["--stages", "teacher,distill"]
    one = subprocess.run(
        [sys.executable, "-m", "edgedistill", "run", str(recipes["one"]), *args], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = TORCHRUN
    run_dir = tmp_path / "two"
    kill_when_written(["run", str(recipes["two"]), *args], run_dir / "teacher" / "last.safetensors", command=torchrun)
    assert not (run_dir / "teacher" / "done.json").exists(), "the run finished before it could be killed"
    two = subprocess.run([*torchrun, "run", str(recipes["two"]), *args], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming after epoch 1/3" in (run_dir / "run.log").read_text()
    for stage in ("teacher", "student"):
        a, b = _steps(tmp_path / "one" / stage / "metrics.jsonl"), _steps(run_dir / stage / "metrics.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]  # each step once: redone epochs not duplicated
        for ra, rb in zip(a, b):
            for key in ("loss", "ce", "kd"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (stage, ra["step"], key)
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["top1"] == pytest.approx(json.loads((tmp_path / "one" / stage / "done.json").read_text())["top1"])
    assert (run_dir / "student" / "model.safetensors").exists()
    assert not list(run_dir.glob("**/.*.tmp"))  # rank 0 alone writes: no half-written file left behind
