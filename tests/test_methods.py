"""Distillation methods: DKD and attention-transfer values, the automatic feature mapping, the statistics of
the verdict, and new recipe keys; the end-to-end runs on real digits are in test_methods_pipeline.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgedistill.errors import RecipeError
from edgedistill.judge.evaluate import images_to_resolve
from edgedistill.judge.metrics import bootstrap_samples, interval, mcnemar_exact, resampled_metric
from edgedistill.judge.summary import advice, verdict
from edgedistill.models.factory import create_model
from edgedistill.recipe.loading import load_recipe
from edgedistill.recipe.sections import FeaturePair, ModelConfig
from edgedistill.train.features import FeatureMatcher, auto_map, model_stages, resolve_pairs
from edgedistill.train.losses import attention_loss, distillation_loss, dkd_loss, kd_loss


# ------------------------------------------------------------------------------------------------- DKD
def reference_dkd(s, t, y, alpha, beta, T):
    """An independent DKD, written the way the authors' code (mdistiller) computes it: masked probabilities,
    log of the binary distribution, and the non-target softmax by pushing the target logit down by 1000."""
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    binary = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(binary(ps)), binary(pt), reduction="sum") * T**2 / s.shape[0]
    nckd = (
        F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
        * T**2
        / s.shape[0]
    )
    return alpha * tckd, beta * nckd


def hand_dkd(s, t, y, T):
    """One sample by hand: binary KL on [p(y), 1 - p(y)] and KL over the softmax of the other logits."""
    soft = lambda z: [math.exp(v / T) / sum(math.exp(u / T) for u in z) for v in z]  # noqa: E731
    ps, pt = soft(s), soft(t)
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    tckd = sum(q * math.log(q / p) for p, q in zip(bs, bt))
    so, to = soft([v for i, v in enumerate(s) if i != y]), soft([v for i, v in enumerate(t) if i != y])
    nckd = sum(q * math.log(q / p) for p, q in zip(so, to))
    return tckd * T * T, nckd * T * T


def test_dkd_matches_hand_computation_and_reference():
    s, t, y = [1.0, 2.0, 0.5, -1.0], [3.0, -1.0, 0.0, 0.5], 0
    for T in (1.0, 4.0):
        tckd, nckd = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, 1.0, 1.0)
        want = hand_dkd(s, t, y, T)
        assert tckd.item() == pytest.approx(want[0], rel=1e-5) and nckd.item() == pytest.approx(want[1], rel=1e-5)
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    for alpha, beta, T in ((1.0, 8.0, 4.0), (0.5, 2.0, 2.0)):
        ours = dkd_loss(s, t, y, T, alpha, beta)
        ref = reference_dkd(s, t, y, alpha, beta, T)
        assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-4)
        assert ours[1].item() == pytest.approx(ref[1].item(), rel=1e-4)


def test_dkd_decomposes_classic_kd():
    """The paper's identity, per sample: KD = TCKD + (1 - p_teacher(target)) * NCKD."""
    torch.manual_seed(1)
    for _ in range(5):
        s, t, y = torch.randn(1, 6) * 2, torch.randn(1, 6) * 2, torch.randint(0, 6, (1,))
        T = 3.0
        tckd, nckd = dkd_loss(s, t, y, T, 1.0, 1.0)
        pt = F.softmax(t / T, 1)[0, y].item()
        assert kd_loss(s, t, T).item() == pytest.approx(tckd.item() + (1 - pt) * nckd.item(), rel=1e-5)


def test_dkd_gradient_reaches_only_the_student_and_stays_finite_for_confident_teachers():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([[40.0, 0, 0, 0, 0]] * 4, requires_grad=True)  # p(target) ~ 1: log(1 - p) must not be -inf
    tckd, nckd = dkd_loss(s, t, torch.zeros(4, dtype=torch.long), 4.0)
    (tckd + nckd).backward()
    assert torch.isfinite(s.grad).all() and t.grad is None


def test_unlabeled_rows_get_kd_but_no_ce():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, -1, 2, -1, 3])
    out = distillation_loss(s, t, y, 3.0, 0.6)
    labeled = y >= 0
    assert out.ce.item() == pytest.approx(F.cross_entropy(s[labeled], y[labeled]).item(), rel=1e-6)
    assert out.kd.item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-6)  # every row
    only_unlabeled = distillation_loss(s[:1], t[:1], torch.tensor([-1]), 3.0, 0.6)
    assert only_unlabeled.ce.item() == 0.0 and math.isfinite(only_unlabeled.total.item())


# ------------------------------------------------------------------------------------------ attention
def test_attention_transfer_matches_hand_computation():
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1 channel
    ft = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # 2 channels: mean of squares
    a_s = [v / math.sqrt(1 + 16 + 81 + 256) for v in (1, 4, 9, 16)]
    raw_t = [(1 + 1) / 2, (0 + 1) / 2, (0 + 1) / 2, (1 + 1) / 2]
    a_t = [v / math.sqrt(sum(x * x for x in raw_t)) for v in raw_t]
    want = sum((a - b) ** 2 for a, b in zip(a_s, a_t)) / 4
    assert attention_loss(fs, ft).item() == pytest.approx(want, rel=1e-6)
    assert attention_loss(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-9)
    big = torch.rand(2, 8, 8, 8)  # a larger map is pooled to the smaller one's size
    assert attention_loss(big, torch.rand(2, 16, 4, 4)).shape == ()


# ------------------------------------------------------------------------------------ feature mapping
def _pairs(teacher, student, size, **kwargs):
    t = create_model(ModelConfig(model=teacher), 10)
    s = create_model(ModelConfig(model=student, model_kwargs=kwargs), 10)
    matcher = FeatureMatcher(resolve_pairs("auto", s, t, size))
    return [(p["student"]["name"], p["teacher"]["name"]) for p in matcher.describe()["pairs"]], matcher


def _projection_shapes(matcher):
    return [tuple(m.proj[0].weight.shape) if hasattr(m, "proj") else None for m in matcher.projectors]


@pytest.mark.parametrize(
    "teacher, student, pairs, shapes",
    [
        (
            "resnet18",
            "mobilenetv3_small_100",
            [
                ("bn1", "act1"),
                ("blocks.0", "layer1"),
                ("blocks.1", "layer2"),
                ("blocks.3", "layer3"),
                ("blocks.5", "layer4"),
            ],
            [(64, 16, 1, 1), (64, 16, 1, 1), (128, 24, 1, 1), (256, 48, 1, 1), (512, 576, 1, 1)],
        ),
        (
            "resnet50",
            "efficientnet_b0",
            [
                ("blocks.0", "act1"),
                ("blocks.1", "layer1"),
                ("blocks.2", "layer2"),
                ("blocks.4", "layer3"),
                ("blocks.6", "layer4"),
            ],
            [(64, 16, 1, 1), (256, 24, 1, 1), (512, 40, 1, 1), (1024, 112, 1, 1), (2048, 320, 1, 1)],
        ),
    ],
)
def test_auto_mapping_of_timm_models_by_feature_info(teacher, student, pairs, shapes):
    got, matcher = _pairs(teacher, student, 224)
    assert got == pairs and _projection_shapes(matcher) == shapes


def test_auto_mapping_resnet18_to_torchvision_squeezenet_through_hooks():
    pairs, matcher = _pairs("resnet18", "squeezenet1_1", 224)
    # SqueezeNet's stages: the last module before each max-pool, and the last Fire module
    assert pairs == [
        ("features.1", "act1"),
        ("features.4", "layer1"),
        ("features.7", "layer2"),
        ("features.12", "layer3"),
    ]
    assert _projection_shapes(matcher) == [None, (64, 128, 1, 1), (128, 256, 1, 1), (256, 512, 1, 1)]


def test_auto_mapping_with_a_dilated_student_takes_the_deepest_stage_of_equal_reduction():
    pairs, _ = _pairs("resnet18", "mobilenetv2_050", 32, output_stride=8)
    assert pairs[-3:] == [("blocks.2", "layer2"), ("blocks.4", "layer2"), ("blocks.6", "layer2")]
    s = model_stages(create_model(ModelConfig(model="mobilenetv2_050", model_kwargs={"output_stride": 8}), 10), 32)
    assert [st.reduction for st in s] == [2, 4, 8, 8, 8]


def test_explicit_mapping_overrides_auto_and_names_bad_modules():
    t = create_model(ModelConfig(model="resnet18"), 10)
    s = create_model(ModelConfig(model="mobilenetv3_small_100"), 10)
    pairs = resolve_pairs([FeaturePair(teacher="layer4", student="blocks.3")], s, t, 64)
    assert [(a.name, b.name, a.channels, b.channels) for a, b in pairs] == [("blocks.3", "layer4", 48, 512)]
    matcher = FeatureMatcher(pairs)
    matcher.attach(s, t)
    s(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        t(torch.randn(2, 3, 64, 64))
    loss = matcher.loss()  # 4x4 student map pooled to the teacher's 2x2
    assert loss.item() > 0
    loss.backward()
    assert matcher.projectors[0].proj[0].weight.grad is not None
    matcher.detach()
    with pytest.raises(RecipeError, match="no module 'layer9'"):
        resolve_pairs([FeaturePair(teacher="layer9", student="blocks.3")], s, t, 64)


def test_auto_map_falls_back_to_the_closest_reduction():
    from edgedistill.train.features import Stage

    student = [Stage("a", 8, 8, 8, 4, 0.5), Stage("b", 8, 1, 1, 64, 1.0)]
    teacher = [Stage("x", 8, 8, 8, 4, 0.5), Stage("y", 8, 2, 2, 32, 1.0)]
    assert [(s.name, t.name) for s, t in auto_map(student, teacher)] == [("a", "x"), ("b", "y")]


# ------------------------------------------------------------------------------------------ statistics
def test_mcnemar_exact_agrees_with_scipy_binomtest():
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    for a_only, b_only, both in ((0, 0, 50), (3, 11, 300), (40, 20, 500), (7, 7, 10)):
        a = np.array([1] * a_only + [0] * b_only + [1] * both, dtype=bool)
        b = np.array([0] * a_only + [1] * b_only + [1] * both, dtype=bool)
        perm = rng.permutation(len(a))
        out = mcnemar_exact(a[perm], b[perm])
        assert (out["a_only"], out["b_only"]) == (a_only, b_only)
        want = 1.0 if a_only + b_only == 0 else binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
        assert out["p_value"] == pytest.approx(want, rel=1e-9)


def test_images_to_resolve_follows_connor_and_shrinks_with_larger_differences():
    # Connor 1987 with p10 = 0.06, p01 = 0.02 (delta 0.04, discordant 0.08): hand-evaluated
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    want = math.ceil((z_a * math.sqrt(0.08) + z_b * math.sqrt(0.08 - 0.04**2)) ** 2 / 0.04**2)
    assert images_to_resolve(60, 20, 1000) == want
    assert images_to_resolve(60, 20, 1000) < images_to_resolve(50, 30, 1000)
    assert images_to_resolve(5, 5, 100) is None


def test_bootstrap_intervals_bracket_the_estimates():
    rng = np.random.default_rng(1)
    labels = np.zeros(400, dtype=np.int64)
    t, s, b = ((rng.random(400) >= p).astype(np.int64) for p in (0.9, 0.8, 0.7))  # 0 = right, 1 = wrong

    def gain_interval(n):
        idx = bootstrap_samples(n, 500, seed=0)
        acc = {k: resampled_metric("top1", labels[:n], v[:n], 2, idx) for k, v in (("t", t), ("s", s), ("b", b))}
        return interval(acc["s"] / acc["t"]), interval(acc["s"] - acc["b"])

    retention, gain = gain_interval(400)
    top1 = {k: float((v == 0).mean()) for k, v in (("t", t), ("s", s), ("b", b))}
    assert retention[0] < top1["s"] / top1["t"] < retention[1]
    assert gain[0] < top1["s"] - top1["b"] < gain[1]
    _, wide = gain_interval(50)
    assert wide[1] - wide[0] > gain[1] - gain[0]


def _summary(gain, p, retention=0.95, a_only=30, b_only=10, need=None):
    return {
        "kd_gain": gain,
        "retention": retention,
        "student": {"model": "mobilenetv3_small_100"},
        "significance": {"p_value": p, "images": 600, "a_only": a_only, "b_only": b_only, "images_to_resolve": need},
        "intervals": {"kd_gain": [gain - 0.01, gain + 0.01], "retention": [0.9, 1.0]},
    }


def test_verdict_needs_significance_to_call_a_gain():
    text, helped = verdict(_summary(0.033, 0.001), 0.005)
    assert helped and text.startswith("distillation helped") and "McNemar p = 0.001" in text
    text, helped = verdict(_summary(0.003, 0.6, a_only=12, b_only=10, need=41000), 0.005)
    assert not helped and text.startswith("within noise") and "41,000" in text
    text, helped = verdict(_summary(-0.02, 0.7, a_only=10, b_only=22, need=9000), 0.005)
    assert not helped and "within noise" in text  # one image is 0.15 points on 651: a -2 point seed is noise
    text, helped = verdict(_summary(-0.05, 0.001, a_only=5, b_only=35), 0.005)
    assert not helped and text.startswith("distillation hurt")


def test_advice_lists_recipe_lines_under_90_percent_retention():
    assert advice(_summary(0.03, 0.01, retention=0.95), 30) == []
    lines = advice(_summary(0.03, 0.01, retention=0.8), 30)
    text = " ".join(lines)
    for needle in (
        "student.model=mobilenetv3_large_100",
        "distill.temperature",
        "distill.features=auto",
        "data.unlabeled=",
        "distill.chain=",
        "student.epochs=60",
    ):
        assert needle in text


# ------------------------------------------------------------------------------------------ recipe keys
@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.metod=dkd", "distill.method"),
        ("distill.dkd_alpah=1", "distill.dkd_alpha"),
        ("distill.dkd_betta=8", "distill.dkd_beta"),
        ("distill.dkd_warmup_epoch=2", "distill.dkd_warmup_epochs"),
        ("distill.featurs=auto", "distill.features"),
        ("distill.feature_los=at", "distill.feature_loss"),
        ("distill.feature_wieght=1", "distill.feature_weight"),
        ("distill.chian=[resnet18]", "distill.chain"),
        ("self_distill.generatons=2", "self_distill.generations"),
        ("self_distil.generations=2", "self_distill"),
        ("data.unlabled=/x", "data.unlabeled"),
        ("distill.chain=[{model: resnet18, epohcs: 3}]", "epochs"),
        ("distill.features=[{teacher: layer1, studnet: blocks.1}]", "student"),
    ],
)
def test_every_new_key_typo_names_the_key(tmp_path, override, expected):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert "did you mean '" in str(err.value) and expected in str(err.value)


def test_new_keys_parse_and_bad_values_are_explained(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    r = load_recipe(
        path,
        [
            "distill.method=dkd",
            "distill.features=auto",
            "distill.feature_loss=at",
            "distill.chain=[resnet10t, {model: mobilenetv2_100, epochs: 3}]",
            "self_distill.generations=2",
        ],
    )
    assert [c.model for c in r.chain_configs()] == ["resnet10t", "mobilenetv2_100"]
    assert r.chain_configs()[1].epochs == 3 and r.chain_configs()[0].epochs == r.student.epochs
    for bad, needle in (
        ("distill.method=fitnet", "distill.method"),
        ("distill.features=everything", "distill.features"),
        ("self_distill.generations=-1", "self_distill.generations"),
    ):
        with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
            load_recipe(path, [bad])
    with pytest.raises(RecipeError, match="distill.features"):
        load_recipe(path, ["distill.feature_weight=2"])
    with pytest.raises(RecipeError, match="use one"):
        load_recipe(path, ["assistant={model: resnet10t}", "distill.chain=[resnet10t]"])
