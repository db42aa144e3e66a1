import pickle

import pytest
import timm
import torch

from edgedistill.errors import CheckpointError, RecipeError
from edgedistill.models.checkpoint import load_model, load_training_state, save_model, save_training_state
from edgedistill.models.factory import create_model
from edgedistill.models.weights import load_state_dict_file
from edgedistill.recipe.sections import ModelConfig


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "last.safetensors"
    save_training_state(path, model, opt, {"epoch": 4, "fingerprint": "abc"})
    assert not list(tmp_path.glob(".*.tmp"))  # temp file renamed into place
    model2 = timm.create_model("mobilenetv3_small_050", num_classes=3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    meta = load_training_state(path, model2, opt2)
    assert meta["epoch"] == 4 and meta["fingerprint"] == "abc"
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"]) and float(s1[0]["step"]) == float(s2[0]["step"])


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    model = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(path, timm.create_model("mobilenetv3_small_050", num_classes=3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(path, model)


class Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickled_objects_are_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"weight": Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_pretrained_path_with_another_class_count_keeps_the_backbone(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_model(ModelConfig(model="resnet10t", pretrained_path=str(path)), num_classes=5)
    assert model.fc.out_features == 5
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    st = tmp_path / "w.safetensors"
    save_model(st, source)
    model = create_model(ModelConfig(model="resnet10t", pretrained_path=str(st)), num_classes=1000)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_squeezenet_through_torchvision_and_unknown_names():
    model = create_model(ModelConfig(model="squeezenet1_1"), num_classes=4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(RecipeError, match="unknown model 'mobilenetv9_tiny'.*similar"):
        create_model(ModelConfig(model="mobilenetv9_tiny"), num_classes=4)
    with pytest.raises(RecipeError, match="pretrained_path"):
        create_model(ModelConfig(model="squeezenet1_0", pretrained=True), num_classes=4)
