"""Inspection metrics against scikit-learn on fixed predictions; the operating point picked on one split and
reported on another; the paired tests; the choice of metric and positive class."""

import numpy as np
import pytest
from sklearn import metrics as skm

from edgedistill.judge import metrics
from edgedistill.judge.evaluate import classification_report, compare_models
from edgedistill.judge.metrics import OperatingPoint, plan_evaluation
from edgedistill.models.predict import Prediction


def _fixed(seed=0, n=600, k=4, skew=(0.55, 0.25, 0.15, 0.05)):
    """Labels from an imbalanced profile and logits of a model that is right about 70% of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=skew)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += rng.normal(1.6, 1.0, size=n)
    return labels, logits


def test_per_class_balanced_accuracy_and_macro_f1_equal_scikit_learns():
    labels, logits = _fixed()
    predicted = logits.argmax(1)
    classes = ["ok", "scratch", "dent", "crack"]
    per = metrics.per_class(labels, predicted, classes)
    p, r, f, support = skm.precision_recall_fscore_support(labels, predicted, labels=range(4), zero_division=0)
    for i, c in enumerate(classes):
        assert per[c]["precision"] == pytest.approx(p[i]) and per[c]["recall"] == pytest.approx(r[i])
        assert per[c]["f1"] == pytest.approx(f[i]) and per[c]["support"] == support[i]
    assert metrics.balanced_accuracy(labels, predicted, 4) == pytest.approx(
        skm.balanced_accuracy_score(labels, predicted)
    )
    assert metrics.macro_f1(labels, predicted, 4) == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    # a class the model never predicts: precision 0 (scikit-learn's zero_division=0), not NaN
    never = np.where(predicted == 3, 0, predicted)
    assert metrics.per_class(labels, never, classes)["crack"]["precision"] == 0.0
    assert metrics.macro_f1(labels, never, 4) == pytest.approx(
        skm.f1_score(labels, never, average="macro", zero_division=0)
    )


def test_roc_auc_and_average_precision_equal_scikit_learns_with_ties():
    labels, logits = _fixed(1)
    positive = labels == 3
    scores = metrics.positive_scores(logits, 3)
    assert metrics.roc_auc(positive, scores) == pytest.approx(skm.roc_auc_score(positive, scores))
    assert metrics.average_precision(positive, scores) == pytest.approx(skm.average_precision_score(positive, scores))
    tied = np.round(scores, 1)  # many ties: both must count them as scikit-learn does
    assert metrics.roc_auc(positive, tied) == pytest.approx(skm.roc_auc_score(positive, tied))
    assert metrics.average_precision(positive, tied) == pytest.approx(skm.average_precision_score(positive, tied))
    fpr, tpr, _ = skm.roc_curve(positive, tied, drop_intermediate=False)
    curve = metrics.roc_curve(positive, tied)
    assert np.allclose(curve["false_reject"], fpr) and np.allclose(curve["recall"], tpr)
    assert metrics.roc_auc(np.zeros(5, bool), np.arange(5.0)) is None  # no positive image: no curve


def test_threshold_is_picked_on_calibration_images_and_reported_on_others():
    rng = np.random.default_rng(3)

    def split(n):
        positive = rng.random(n) < 0.2
        return positive, np.clip(np.where(positive, rng.normal(0.7, 0.15, n), rng.normal(0.3, 0.15, n)), 0, 1)

    calib_pos, calib_scores = split(400)
    test_pos, test_scores = split(3000)
    t = metrics.pick_threshold(calib_pos, calib_scores, OperatingPoint(target_recall=0.95))
    on_calib = metrics.rates_at(calib_pos, calib_scores, t)
    assert on_calib["recall"] >= 0.95
    # the highest such threshold: raising it past the next positive score loses recall on the calibration split
    assert (
        metrics.rates_at(calib_pos, calib_scores, np.sort(calib_scores[calib_scores >= t])[0] + 1e-9)["recall"] < 0.95
    )
    on_test = metrics.rates_at(test_pos, test_scores, t)
    assert abs(on_test["recall"] - 0.95) < 0.05  # held-out recall near the target, not guaranteed
    t2 = metrics.pick_threshold(calib_pos, calib_scores, OperatingPoint(max_false_reject=0.05))
    assert metrics.rates_at(calib_pos, calib_scores, t2)["false_reject"] <= 0.05
    assert (
        metrics.rates_at(calib_pos, calib_scores, np.sort(calib_scores[calib_scores < t2])[-1])["false_reject"] > 0.05
    )
    # the threshold lies between scores, never on one: device rounding cannot flip an image
    assert t not in set(calib_scores) and t2 not in set(calib_scores)
    with pytest.raises(ValueError, match="no positive"):
        metrics.pick_threshold(np.zeros(4, bool), np.arange(4.0), OperatingPoint(target_recall=0.9))


def test_compare_models_reports_the_operating_point_of_each_model_on_the_other_split():
    labels, logits = _fixed(4, n=800, k=2, skew=(0.8, 0.2))
    calib_labels, calib_logits = _fixed(5, n=400, k=2, skew=(0.8, 0.2))
    plan = plan_evaluation(None, None, OperatingPoint(max_false_reject=0.1), ["good", "defect"], labels)
    assert plan.metric == "balanced_accuracy" and plan.positive == "defect" and "minority" in plan.positive_reason
    preds = {r: Prediction(logits + (0.3 * i), labels) for i, r in enumerate(("teacher", "student", "baseline"))}
    calib = {r: Prediction(calib_logits + (0.3 * i), calib_labels) for i, r in enumerate(preds)}
    out = compare_models(preds, plan, calib, "calib", samples=300)
    op = out["operating_point"]
    scores = metrics.positive_scores(calib_logits, 1)
    want = metrics.pick_threshold(calib_labels == 1, scores, OperatingPoint(max_false_reject=0.1))
    assert op["teacher"]["threshold"] == pytest.approx(want)
    here = metrics.rates_at(labels == 1, metrics.positive_scores(logits, 1), want)
    assert op["teacher"]["recall"] == pytest.approx(here["recall"])
    assert op["teacher"]["false_reject"] == pytest.approx(here["false_reject"])
    assert op["teacher"]["calibration"]["false_reject"] <= 0.1
    lo, hi = op["teacher"]["recall_interval"]
    assert lo <= here["recall"] <= hi
    assert out["models"]["student"]["roc_auc"] == pytest.approx(
        skm.roc_auc_score(labels == 1, preds["student"].logits[:, 1] - preds["student"].logits[:, 0])
    )
    assert out["kd_gain"] == pytest.approx(
        out["models"]["student"]["balanced_accuracy"] - out["models"]["baseline"]["balanced_accuracy"]
    )
    assert out["significance"]["test"] == "permutation"


def test_recall_at_false_reject_is_judged_with_mcnemar_on_the_positive_images():
    labels, logits = _fixed(6, n=1000, k=2, skew=(0.7, 0.3))
    calib_labels, calib_logits = _fixed(7, n=500, k=2, skew=(0.7, 0.3))
    plan = plan_evaluation("recall_at_false_reject", "1", None, ["0", "1"], labels)
    better = logits.copy()
    better[:, 1] += np.where(labels == 1, 1.0, 0.0)  # a student that scores defects higher
    preds = {
        "teacher": Prediction(better, labels),
        "student": Prediction(better, labels),
        "baseline": Prediction(logits, labels),
    }
    calib = {
        "teacher": Prediction(calib_logits, calib_labels),
        "student": Prediction(calib_logits, calib_labels),
        "baseline": Prediction(calib_logits, calib_labels),
    }
    out = compare_models(preds, plan, calib, "calib", samples=200)
    sig = out["significance"]
    assert sig["test"] == "mcnemar" and sig["images"] == int((labels == 1).sum())
    assert out["kd_gain"] > 0 and sig["p_value"] < 0.05
    t = out["models"]["student"]["metric_threshold"]
    assert out["models"]["student"]["score"] == pytest.approx(
        metrics.rates_at(labels == 1, metrics.positive_scores(better, 1), t)["recall"]
    )


def test_permutation_test_finds_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(8)
    labels = rng.choice(3, size=500, p=(0.7, 0.2, 0.1))
    good = np.where(rng.random(500) < 0.85, labels, rng.integers(0, 3, 500))
    weak = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 3, 500))
    real = metrics.permutation_test("balanced_accuracy", labels, good, weak, 3, resamples=2000)
    assert real["p_value"] < 0.01
    assert real["difference"] == pytest.approx(
        skm.balanced_accuracy_score(labels, good) - skm.balanced_accuracy_score(labels, weak)
    )
    same = metrics.permutation_test("macro_f1", labels, good, good, 3, resamples=200)
    assert same["p_value"] == 1.0 and same["discordant"] == 0
    # exchangeable models (each image's two predictions drawn alike): p is roughly uniform, rarely under 0.05
    ps = [
        metrics.permutation_test(
            "macro_f1",
            labels,
            *(np.where(rng.random(500) < 0.7, labels, rng.integers(0, 3, 500)) for _ in range(2)),
            3,
            resamples=400,
            seed=s,
        )["p_value"]
        for s in range(20)
    ]
    assert sum(p < 0.05 for p in ps) <= 3


def test_metric_and_positive_class_defaults_say_why():
    balanced = np.repeat(np.arange(3), [100, 90, 80])
    plan = plan_evaluation(None, None, None, ["a", "b", "c"], balanced)
    assert plan.metric == "top1" and "balanced within 1.5x" in plan.metric_reason and plan.positive is None
    skewed = np.repeat(np.arange(2), [300, 100])
    plan = plan_evaluation(None, None, None, ["good", "defect"], skewed)
    assert plan.metric == "balanced_accuracy" and "3.0x" in plan.metric_reason and plan.positive == "defect"
    warned = plan_evaluation("top1", None, None, ["good", "defect"], skewed)
    assert warned.metric == "top1" and "imbalanced 3.0:1" in warned.warnings[0]
    with pytest.raises(ValueError, match="positive_class 'defekt'.*did you mean 'defect'"):
        plan_evaluation(None, "defekt", None, ["good", "defect"], skewed)
    with pytest.raises(ValueError, match="needs a positive class"):
        plan_evaluation(None, None, OperatingPoint(target_recall=0.9), ["a", "b", "c"], balanced)
    unlabeled = np.r_[skewed, -np.ones(500, dtype=np.int64)]  # unlabeled rows do not count
    assert plan_evaluation(None, None, None, ["good", "defect"], unlabeled).imbalance == pytest.approx(3.0)


def test_classification_report_scores_the_plans_metric():
    labels, logits = _fixed(9, k=2, skew=(0.85, 0.15))
    pred = Prediction(logits, labels)
    plan = plan_evaluation(None, None, None, ["good", "defect"], labels)
    report = classification_report(pred, ["good", "defect"], plan)
    assert report["score"] == report["balanced_accuracy"] != report["top1"]
    assert report["positive"]["roc_auc"] == pytest.approx(skm.roc_auc_score(labels == 1, logits[:, 1] - logits[:, 0]))
    assert report["per_class_metrics"]["defect"]["support"] == int((labels == 1).sum())
