"""The planner's ESTIMATE of an anomaly detector's networks as they ship, on a Jetson profile in FP16: the whole
detector (stfpm: teacher and student; efficientad: its three small networks), and for efficientad the pair it
must beat (STFPM on a ResNet-18). Estimates, never measurements: ``edgerun bench`` measures on the board."""

from __future__ import annotations

import logging

import torch

from edgedistill.train.efficientad import stfpm_resnet18_reference

log = logging.getLogger(__name__)


def device_estimate(detector: torch.nn.Module, recipe) -> dict | None:
    """The planner's ESTIMATE of the whole detector as it ships (stfpm: teacher and student up to their last
    stage; efficientad: the small teacher, student and autoencoder; the map's upsampling and smoothing) on
    ``export.target`` in FP16, with its interval; for efficientad also STFPM on a ResNet-18's estimate (the pair
    distillation for speed must beat) and the ratio. None off the Jetson profiles."""
    from edgedistill.errors import EdgedistillError
    from edgedistill.plan.calibration import factors_for
    from edgerun.profiles import get_target

    target = get_target(recipe.export.target)
    if not target.get("gpu"):
        return None
    try:
        factors = factors_for(recipe.export.target)
    except EdgedistillError as exc:
        log.warning("anomaly: no device estimate for %s: %s", recipe.export.target, exc)
        return None
    size = recipe.data.image_size
    small = recipe.anomaly.method == "efficientad"
    shipped = "small teacher, student and autoencoder" if small else "teacher and student"
    est = {
        "device": target["device"],
        "target": recipe.export.target,
        "precision": "fp16",
        "image_size": size,
        **network_estimate(detector, f"{recipe.anomaly.method}:{recipe.teacher.model}", size, target, factors),
        "networks": shipped,
        "label": f"estimate (edgedistill plan), not a measurement: {shipped} together",
    }
    if recipe.anomaly.method == "efficientad":
        ref = network_estimate(stfpm_resnet18_reference(size), "stfpm:resnet18", size, target, factors)
        est["reference"] = {"name": "stfpm on a ResNet-18 (stages 1-3)", **ref}
        est["speedup"] = ref["est_latency_ms"] / est["est_latency_ms"]
    return est


def network_estimate(module: torch.nn.Module, name: str, size: int, target: dict, factors) -> dict:
    """The planner's FP16 batch-1 ESTIMATE of one module on ``target`` with ``factors``: latency, FPS and its
    interval, memory, GMACs and what the interval rests on."""
    from edgedistill.plan.heldout import interval
    from edgedistill.plan.profile import profile_module
    from edgedistill.plan.roofline import _arrays, layer_times_ms, model_memory_mb

    prof = profile_module(module, name, size)
    ms = layer_times_ms(prof, target, "fp16", 1, factors)
    lo, hi, basis = interval(ms, factors, bool(_arrays(prof)["dw"].any()))
    engine_mb, activations_mb = model_memory_mb(prof, "fp16", 1)
    return {
        "est_latency_ms": ms,
        "est_fps": 1000.0 / ms,
        "est_fps_lo": 1000.0 / hi,
        "est_fps_hi": 1000.0 / lo,
        "est_memory_mb": factors.runtime_base_mb + engine_mb + activations_mb,
        "gmacs": prof.macs / 1e9,
        "basis": basis,
    }
