"""A model's layers as the planner sees them: FLOPs (PyTorch's own counter, ``FlopCounterMode``: a
multiply-accumulate is 2 FLOPs), bytes moved and kind (dense or depthwise convolution, linear, pooling) per kernel,
parameters and the largest activation, for one image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from edgedistill.models.factory import count_params, create_model


@dataclass
class Layer:
    kind: str  # conv | dwconv (grouped) | linear | pool | other
    flops: float
    in_elems: int
    out_elems: int
    weight_elems: int


@dataclass
class ModelProfile:
    model: str
    image_size: int
    params: int
    flops: float  # per image, FLOPs (2 x MACs), PyTorch's FlopCounterMode
    layers: list = field(default_factory=list)
    activation_peak_elems: int = 0

    @property
    def macs(self) -> float:
        return self.flops / 2


def build_architecture(name: str, num_classes: int = 1000, framework: str = "auto") -> nn.Module:
    """An untrained network of that name (nothing downloaded): torchvision for the calibration rows and the
    SqueezeNets, timm otherwise."""
    import torchvision

    if framework == "torchvision" or (framework == "auto" and name.startswith("squeezenet")):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    from edgedistill.recipe.sections import ModelConfig

    return create_model(ModelConfig(model=name), num_classes)


@lru_cache(maxsize=128)
def profile_model(name: str, image_size: int = 224, framework: str = "auto", num_classes: int = 1000) -> ModelProfile:
    """Parameters, FLOPs and the per-kernel costs the roofline needs, from one forward pass at batch 1."""
    return profile_module(build_architecture(name, num_classes, framework), name, image_size)


def profile_module(model: nn.Module, name: str, image_size: int) -> ModelProfile:
    """:func:`profile_model` for a module already built (an anomaly detector: teacher and student together)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    records = []

    def hook(module, inputs, output):
        out = output if torch.is_tensor(output) else output[0]
        records.append((module, int(inputs[0].numel()), int(out.numel())))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    ]
    names = {m: n for n, m in model.named_modules()}
    root = type(model).__name__
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    total = float(counter.get_total_flops())
    layers, counted = [], 0.0
    for module, n_in, n_out in records:
        key = f"{root}.{names[module]}" if names[module] else root
        flops = float(sum(counts.get(key, {}).values())) if isinstance(module, (nn.Conv2d, nn.Linear)) else 0.0
        if isinstance(module, nn.Conv2d):
            kind = "dwconv" if module.groups > 1 else "conv"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        else:
            kind, flops = "pool", float(n_in)  # one add or compare per input element
        weight = sum(p.numel() for p in module.parameters(recurse=False))
        counted += flops if kind != "pool" else 0.0
        layers.append(Layer(kind, flops, n_in, n_out, int(weight)))
    rest = max(total - counted, 0.0)  # attention matmuls and other ops outside conv/linear modules
    if rest > 0.01 * total:
        layers.append(Layer("other", rest, 0, 0, 0))
    peak = max((lay.in_elems + lay.out_elems for lay in layers), default=0)
    return ModelProfile(name, image_size, count_params(model), total, layers, peak)
