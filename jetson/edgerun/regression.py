"""Regression bundles: the model predicts standardized numbers; the manifest's ``targets`` turns them back.

A regression bundle (manifest ``"task": "regression"``) has one model output per target, standardized with the
training split's statistics; ``targets`` = ``{"names": [...], "mean": [...], "std": [...]}`` restores target
units (``value = output * std + mean``). Shared by ``edgerun validate`` and ``edgerun camera`` on the device and
by edgedistill's evaluation on the host, so both sides compute MAE and R^2 the same way. Python 3.6, numpy only.
"""

import numpy as np

from edgerun.errors import BundleError


def check_targets(data, where):
    """Raise BundleError unless ``data`` (a manifest dictionary) has a well-formed ``targets`` for its outputs."""
    targets = data.get("targets")
    if not isinstance(targets, dict):
        raise BundleError("%s: a regression bundle needs 'targets' {names, mean, std}" % where)
    names, mean, std = targets.get("names"), targets.get("mean"), targets.get("std")
    if not (
        isinstance(names, list)
        and isinstance(mean, list)
        and isinstance(std, list)
        and len(names) == len(mean) == len(std)
        and names
    ):
        raise BundleError("%s: 'targets' needs names, mean and std lists of one length" % where)
    if names != list(data["classes"]):
        raise BundleError("%s: 'targets.names' must equal 'classes' (one model output per target)" % where)
    if any(not isinstance(s, (int, float)) or s <= 0 for s in std):
        raise BundleError("%s: every 'targets.std' must be a positive number" % where)


def restore(targets, outputs):
    """Model outputs (N, K), standardized -> target units."""
    return np.asarray(outputs, dtype=np.float64) * np.asarray(targets["std"]) + np.asarray(targets["mean"])


def regression_metrics(predicted, target):
    """MAE and RMSE (target units) and R^2 of one target column."""
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    err = predicted - target
    sst = float(((target - target.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": float(1 - (err**2).sum() / sst) if sst > 0 else 0.0,
    }


def summarize(predicted, target, names):
    """Per target and averaged over targets (``mae``, ``rmse``, ``r2``) for (N, K) arrays in target units."""
    per_target = dict((name, regression_metrics(predicted[:, i], target[:, i])) for i, name in enumerate(names))
    out = dict((k, float(np.mean([m[k] for m in per_target.values()]))) for k in ("mae", "rmse", "r2"))
    out["per_target"] = per_target
    return out
