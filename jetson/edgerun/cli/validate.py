"""``edgerun validate``: the bundle's validation images through this device's runner, against the host's figures
(top-1, the reject decision at the bundle's threshold, or R^2 for regression)."""

import numpy as np

from edgerun.cli.common import (
    active_runner,
    add_runner_args,
    bundle_outputs,
    check_outputs,
    number,
    open_from_args,
    write_json,
)


def _validate_regression(args, bundle, runner):
    """MAE and R^2 against the bundle's targets (target units), next to the host's; PASS while R^2 drops at most
    --max-drop."""
    from edgerun.regression import restore, summarize

    m = bundle.manifest
    outputs, targets = bundle_outputs(runner, bundle)
    got = summarize(restore(m.targets, outputs), np.asarray(targets, dtype=np.float64), m.classes)
    host = m.data["metrics"].get("int8", {})
    host_r2, host_mae = host.get("fp32_r2"), host.get("fp32_mae")
    what = args.engine or "onnxruntime:%s" % (args.variant or "fp32")
    print(
        "MAE %.4g  RMSE %.4g  R2 %.4f on %d bundle images (%s)"
        % (got["mae"], got["rmse"], got["r2"], len(targets), what)
    )
    for name, t in sorted(got["per_target"].items()):
        print("  %s: MAE %.4g  R2 %.4f" % (name, t["mae"], t["r2"]))
    if host_r2 is not None:
        print("host  FP32 MAE %.4g  R2 %.4f" % (host_mae, host_r2))
    drop = (host_r2 - got["r2"]) if host_r2 is not None else 0.0
    result = {
        "task": "regression",
        "mae": got["mae"],
        "rmse": got["rmse"],
        "r2": got["r2"],
        "per_target": got["per_target"],
        "host_fp32_r2": host_r2,
        "host_fp32_mae": host_mae,
        "drop": drop,
        "max_drop": args.max_drop,
        "status": "PASS" if drop <= args.max_drop else "FAIL",
    }
    if args.json:
        write_json(args.json, result)
    print("VERDICT: %s (R2 drop %.4f vs host FP32, limit %.4f)" % (result["status"], drop, args.max_drop))
    return 0 if result["status"] == "PASS" else 1


def _decision_check(bundle, logits, labels, max_drop, precision="fp32"):
    """With an operating point in the manifest: recall and false-reject rate of the positive class at the threshold
    of the model that ran (``precision`` int8: the INT8 model's own) on the bundle's check images, which chose
    nothing, against the host's FP32 figures on the same images; None without one."""
    from edgerun.decision import positive_scores, rates_at, threshold_for

    m = bundle.manifest
    decision = m.decision
    if decision.get("threshold") is None:
        return None
    index = m.classes.index(decision["positive_class"])
    threshold = threshold_for(decision, precision)
    got = rates_at(np.asarray(labels) == index, positive_scores(logits, index), threshold)
    host = m.data["metrics"].get("int8", {})
    host_recall, host_fr = host.get("fp32_recall"), host.get("fp32_false_reject")
    recall_drop = (host_recall - got["recall"]) if None not in (host_recall, got["recall"]) else 0.0
    fr_rise = (got["false_reject"] - host_fr) if None not in (host_fr, got["false_reject"]) else 0.0
    ok = recall_drop <= max_drop and fr_rise <= max_drop
    pct = lambda v: "-" if v is None else "%.1f%%" % (100 * v)  # noqa: E731
    print(
        "%s at threshold %.4f: recall %s (%d of %d rejected), false-reject %s (%d of %d good rejected)"
        % (
            decision["positive_class"],
            threshold,
            pct(got["recall"]),
            got["detected"],
            got["positives"],
            pct(got["false_reject"]),
            got["false_rejects"],
            got["negatives"],
        )
    )
    if host_recall is not None:
        host_int8 = host.get("int8") or {}
        print(
            "host  FP32 recall %s, false-reject %s on the same images%s"
            % (
                pct(host_recall),
                pct(host_fr),
                "   INT8 %s, %s (its own threshold %.4f)"
                % (pct(host_int8.get("recall")), pct(host_int8.get("false_reject")), host_int8["threshold"])
                if host_int8.get("threshold") is not None
                else "",
            )
        )
    return dict(
        got,
        positive_class=decision["positive_class"],
        host_fp32_recall=host_recall,
        host_fp32_false_reject=host_fr,
        recall_drop=recall_drop,
        false_reject_rise=fr_rise,
        status="PASS" if ok else "FAIL",
    )


def _validate_anomaly(args, bundle, runner):
    """Image AUROC of the anomaly score on the bundle's images (good and defective), and recall and false-reject at
    the threshold of the model that ran (an INT8 model's own, picked on the same good images by the same rule),
    against the host's FP32 figures; PASS while each moves at most --max-drop."""
    from edgerun.decision import auroc, rates_at, threshold_for

    m = bundle.manifest
    scores, labels = bundle_outputs(runner, bundle)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(labels), -1).max(axis=1)
    bad = np.asarray(labels) == 1
    threshold = threshold_for(m.decision, runner.precision)
    got = rates_at(bad, scores, threshold)
    got_auroc = auroc(bad, scores)
    host = m.data["metrics"].get("anomaly") or {}
    what = args.engine or "onnxruntime:%s" % (args.variant or "fp32")
    pct = lambda v: "-" if v is None else "%.1f%%" % (100 * v)  # noqa: E731
    print(
        "image AUROC %s on %d bundle images, %d defective (%s)"
        % ("-" if got_auroc is None else "%.4f" % got_auroc, len(labels), int(bad.sum()), what)
    )
    print(
        "at threshold %.4g: recall %s (%d of %d rejected), false-reject %s (%d of %d good rejected)"
        % (
            threshold,
            pct(got["recall"]),
            got["detected"],
            got["positives"],
            pct(got["false_reject"]),
            got["false_rejects"],
            got["negatives"],
        )
    )
    drops = {
        "auroc_drop": (host["image_auroc"] - got_auroc) if None not in (host.get("image_auroc"), got_auroc) else 0.0,
        "recall_drop": (host["recall"] - got["recall"]) if None not in (host.get("recall"), got["recall"]) else 0.0,
        "false_reject_rise": (got["false_reject"] - host["false_reject"])
        if None not in (host.get("false_reject"), got["false_reject"])
        else 0.0,
    }
    if host:
        print(
            "host  AUROC %s, recall %s, false-reject %s on the same images"
            % (
                "-" if host.get("image_auroc") is None else "%.4f" % host["image_auroc"],
                pct(host.get("recall")),
                pct(host.get("false_reject")),
            )
        )
    ok = all(v <= args.max_drop for v in drops.values())
    result = dict(
        got,
        task="anomaly",
        image_auroc=got_auroc,
        threshold=threshold,
        host=host,
        max_drop=args.max_drop,
        status="PASS" if ok else "FAIL",
        **drops,
    )
    if args.json:
        write_json(args.json, result)
    print(
        "VERDICT: %s (AUROC drop %.4f, recall drop %.2f, false-reject rise %.2f points vs host; limit %.2f)"
        % (
            result["status"],
            drops["auroc_drop"],
            drops["recall_drop"] * 100,
            drops["false_reject_rise"] * 100,
            args.max_drop * 100,
        )
    )
    return 0 if ok else 1


def cmd_validate(args):
    check_outputs(args)
    bundle = open_from_args(args)
    if bundle.manifest.task == "anomaly":
        with active_runner(args, bundle) as runner:
            return _validate_anomaly(args, bundle, runner)
    if bundle.manifest.task == "regression":
        with active_runner(args, bundle) as runner:
            return _validate_regression(args, bundle, runner)
    with active_runner(args, bundle) as runner:
        logits, labels = bundle_outputs(runner, bundle)
    top1 = float((logits.argmax(1) == labels).mean())
    metrics = bundle.manifest.data["metrics"]
    host_fp32 = metrics.get("int8", {}).get("fp32_top1")
    host_int8 = (metrics.get("int8", {}).get("int8") or {}).get("top1")
    what = args.engine or "onnxruntime:%s" % (args.variant or "fp32")
    print("top-1 %.2f%% on %d bundle images (%s)" % (top1 * 100, bundle.manifest.data["samples"]["val"]["count"], what))
    if host_fp32 is not None:
        print(
            "host  FP32 %.2f%%%s"
            % (host_fp32 * 100, "   INT8 %.2f%%" % (host_int8 * 100) if host_int8 is not None else "")
        )
    drop = (host_fp32 - top1) if host_fp32 is not None else 0.0
    decision = _decision_check(bundle, logits, labels, args.max_drop, runner.precision)
    ok = drop <= args.max_drop and (decision is None or decision["status"] == "PASS")
    result = {
        "top1": top1,
        "host_fp32_top1": host_fp32,
        "host_int8_top1": host_int8,
        "drop": drop,
        "max_drop": args.max_drop,
        "decision": decision,
        "status": "PASS" if ok else "FAIL",
    }
    if args.json:
        write_json(args.json, result)
    line = "VERDICT: %s (drop %.2f points vs host FP32" % (result["status"], drop * 100)
    if decision is not None:
        line += ", recall drop %.2f, false-reject rise %.2f points" % (
            decision["recall_drop"] * 100,
            decision["false_reject_rise"] * 100,
        )
    print(line + ", limit %.2f)" % (args.max_drop * 100))
    return 0 if result["status"] == "PASS" else 1


def add_parser(sub):
    p = sub.add_parser("validate", help="accuracy on the bundle's validation images vs the host")
    add_runner_args(p)
    p.add_argument(
        "--max-drop",
        type=number(0, 1),
        default=0.01,
        help="allowed top-1 drop vs host FP32 (0.01 = 1 point), and with an operating point in the bundle "
        "the allowed recall drop and false-reject rise at its threshold; regression: allowed R2 drop",
    )
    p.add_argument("--json")
    p.set_defaults(handler=cmd_validate)
