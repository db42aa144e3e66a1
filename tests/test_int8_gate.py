"""The INT8 gate on the line's terms (edgedistill.ship.gate): images apart, each variant at its own threshold,
non-inferiority of recall and false-reject rate."""

import functools

import numpy as np
import pytest

from edgedistill.judge.thresholds import OperatingPoint, pick_threshold
from edgedistill.ship.gate import LineGate, split_apart
from edgedistill.ship.int8 import Attempt

POINT = OperatingPoint(max_false_reject=0.05, confidence=0.95)


def _line(n_calib=2000, n_gate=2000, seed=0):
    """Two classes (1 = defect, 1 in 5), FP32 logits whose defect margin separates them well but not perfectly."""
    rng = np.random.default_rng(seed)

    def draw(n):
        labels = (rng.random(n) < 0.2).astype(int)
        margin = rng.normal(np.where(labels == 1, 1.5, -2.5), 1.0)  # logit(defect) - logit(good)
        return labels, np.stack([np.zeros(n), margin], 1)

    (cal_y, cal_x), (gate_y, gate_x) = draw(n_calib), draw(n_gate)
    gate = LineGate(
        positive_index=1,
        calib_labels=cal_y,
        gate_labels=gate_y,
        fp32_calib=cal_x,
        fp32_gate=gate_x,
        pick=functools.partial(pick_threshold, point=POINT),
        margin=0.01,
        resamples=300,
    )
    return gate, cal_x, gate_x, cal_y, gate_y


def _scrambled(logits, rng):
    """Top-1 unchanged, the defect score's order lost below the arg-max: an INT8 model that keeps its arg-max and
    loses the ranking the line's threshold (under 0.5) lives on."""
    out = logits.copy()
    below = out[:, 1] < 0  # defect not the arg-max
    out[below, 1] = -rng.uniform(0, 4, below.sum())
    return out


def test_a_variant_whose_top1_holds_but_whose_recall_at_the_threshold_drops_is_rejected():
    gate, cal_x, gate_x, _, gate_y = _line()
    rng = np.random.default_rng(1)
    cal_v, gate_v = _scrambled(cal_x, rng), _scrambled(gate_x, rng)
    assert (gate_v.argmax(1) == gate_x.argmax(1)).all()  # top-1 holds, image for image
    got = gate.judge(cal_v, gate_v)
    assert got["recall_drop"] > 0.05 and got["recall_drop_upper"] > got["margin"]
    assert not got["passes"]
    assert Attempt("ptq", None, 0.9, {"top1": 0.9, "line": got}, drop=0.0).passes(0.01) is False  # top-1 drop 0


def test_a_variant_that_only_rescales_its_scores_passes_at_its_own_threshold():
    """Its threshold re-picked on the calibration images, it decides every image as FP32 does: both bounds 0, while at
    FP32's threshold it would lose most of its recall."""
    gate, cal_x, gate_x, _, gate_y = _line()
    shift = np.array([0.0, -3.0])  # the defect logit 3 lower everywhere: a monotone change of its probability
    got = gate.judge(cal_x + shift, gate_x + shift)
    assert got["passes"] and got["recall_drop_upper"] == 0 and got["false_reject_rise_upper"] == 0
    assert got["threshold"] < got["fp32_threshold"]
    at_fp32 = gate.rates(gate_x + shift, gate_y, got["fp32_threshold"])
    assert at_fp32["recall"] < got["fp32_recall"] - 0.3


def test_a_few_gate_defects_cannot_prove_non_inferiority_of_a_variant_that_differs():
    """The same small disagreement passes on many gate images and not on few: the bound, not the raw difference."""
    rng = np.random.default_rng(2)
    results = {}
    for n_gate in (200, 20000):
        gate, cal_x, gate_x, _, _ = _line(n_gate=n_gate, seed=3)
        noise = lambda x: x + np.stack([np.zeros(len(x)), rng.normal(0, 0.1, len(x))], 1)  # noqa: E731
        results[n_gate] = gate.judge(noise(cal_x), noise(gate_x))
    bound = {n: max(r["recall_drop_upper"], r["false_reject_rise_upper"]) for n, r in results.items()}
    assert abs(results[20000]["recall_drop"]) < 0.01 and results[20000]["passes"] and bound[20000] <= 0.01
    assert not results[200]["passes"] and bound[200] > 0.01  # ~40 defects, 160 good parts: one image > 0.6 points


def test_the_gate_says_when_the_calibration_split_not_the_gate_images_leaves_the_bound_wide():
    """Many gate images: with the thresholds held the recall bound is narrower than with them re-picked (the
    gate's test), and where only the re-picked one is over the margin the advice names the calibration split, not
    export.gate_samples; few gate images: the advice names the gate images."""
    import dataclasses

    from edgedistill.ship.int8 import limited_by

    rng = np.random.default_rng(6)
    noise = lambda x: x + np.stack([np.zeros(len(x)), rng.normal(0, 0.2, len(x))], 1)  # noqa: E731
    gate, cal_x, gate_x, _, _ = _line(n_calib=1000, n_gate=20000, seed=5)
    gate = dataclasses.replace(gate, margin=0.004)
    got = gate.judge(noise(cal_x), noise(gate_x))
    assert got["recall_drop_upper_gate_only"] <= 0.004 < got["recall_drop_upper"] and not got["passes"]
    assert got["calibration_positives"] + got["calibration_negatives"] == 1000
    text = limited_by(got)
    assert "more calibration images" in text and "more gate images do not" in text
    few_gate, cal_x, gate_x, _, _ = _line(n_calib=1000, n_gate=200, seed=5)
    louder = lambda x: x + np.stack([np.zeros(len(x)), rng.normal(0, 0.6, len(x))], 1)  # noqa: E731
    got = few_gate.judge(louder(cal_x), louder(gate_x))
    assert got["recall_drop_upper_gate_only"] > 0.01
    assert "more gate images (export.gate_samples) narrow it" in limited_by(got)


@pytest.mark.parametrize("n, n_check, n_gate", [(1000, 300, 500), (100, 300, 1000), (7, 3, 3), (1, 300, 1000)])
def test_check_and_gate_images_are_apart_and_share_each_class(n, n_check, n_gate):
    labels = np.arange(n) % 5 == 0  # one defect in five
    check, gate = split_apart(labels.astype(int), n, n_check, n_gate, seed=0)
    assert not set(check) & set(gate) and len(set(check)) == len(check)
    assert len(check) == min(n_check, max(1, n // 2) if n_check + n_gate > n else n_check)
    assert len(check) + len(gate) <= n
    if n >= 100:
        for part in (check, gate):
            assert abs(labels[part].mean() - 0.2) < 0.02  # stratified: one defect in five in both
    again = split_apart(labels.astype(int), n, n_check, n_gate, seed=0)
    assert all((a == b).all() for a, b in zip(again, (check, gate)))  # the seed draws the same images


def test_the_device_rejects_at_the_running_models_own_threshold():
    from types import SimpleNamespace

    from edgerun.decision import threshold_for
    from edgerun.line.camera import reject_rule

    decision = {
        "positive_class": "defect",
        "threshold": 0.31,
        "thresholds": {"fp32": 0.31, "int8": 0.27},
        "operating_point": {"max_false_reject": 0.02},
        "calibration_split": "val",
    }
    manifest = SimpleNamespace(decision=decision)
    assert threshold_for(decision, "int8") == 0.27 and threshold_for(decision, "fp16") == 0.31
    threshold, source = reject_rule(manifest, "defect", precision="int8")
    assert threshold == 0.27 and "the INT8 model's own threshold" in source
    assert reject_rule(manifest, "defect", precision="fp16")[0] == 0.31  # an FP16 engine keeps FP32's
    assert reject_rule(manifest, "defect", 0.5, precision="int8") == (0.5, "--threshold")
    older = SimpleNamespace(decision={k: v for k, v in decision.items() if k != "thresholds"})
    assert reject_rule(older, "defect", precision="int8")[0] == 0.31  # a bundle from before: its one threshold
