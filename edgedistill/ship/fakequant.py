"""Fake quantization in PyTorch for quantization-aware distillation: the trained student with exactly the layers
the INT8 model quantizes wrapped (the same activation scales, per-channel weight scales), BatchNorm statistics
frozen, and unwrapped again into a plain model for export.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgedistill.ship.qdq import INT8_MAX, MIN_AMAX


# ------------------------------------------------------------------------- quantization-aware distillation
def module_for_node(node_name: str) -> str:
    """The PyTorch module path behind an exported node name: '/blocks/blocks.0/blocks.0.0/se/conv_reduce/Conv' ->
    'blocks.0.0.se.conv_reduce' (each scope segment is a child name, or its parent's segment extended by dots)."""
    current, last = "", ""
    for segment in node_name.strip("/").split("/")[:-1]:
        if last and segment.startswith(last + "."):
            current = current[: len(current) - len(last)] + segment
        else:
            current = f"{current}.{segment}" if current else segment
        last = segment
    return current


def _fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().abs().reshape(weight.shape[0], -1).amax(1)
    scale = (flat.clamp_min(MIN_AMAX) / INT8_MAX).float()
    return torch.fake_quantize_per_channel_affine(
        weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -128, 127
    )


class FakeQuantized(nn.Module):
    """A Conv2d or Linear whose input is fake-quantized per tensor with a fixed amax (the PTQ calibration's) and whose
    weight is fake-quantized per output channel by its own largest magnitudes, as the exported model will be;
    gradients pass straight through (the straight-through estimator of PyTorch's fake_quantize ops)."""

    def __init__(self, inner: nn.Module, input_amax: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("input_amax", torch.tensor(float(input_amax)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.input_amax.clamp_min(MIN_AMAX) / INT8_MAX).float()
        x = torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros((), dtype=torch.int32), -128, 127)
        weight = _fake_quant_per_channel(self.inner.weight)
        if isinstance(self.inner, nn.Linear):
            return nn.functional.linear(x, weight, self.inner.bias)
        return self.inner._conv_forward(x, weight, self.inner.bias)


def add_fake_quant(model: nn.Module, input_amax: dict[str, float]) -> nn.Module:
    """A copy of ``model`` with the modules named in ``input_amax`` wrapped in :class:`FakeQuantized`."""
    model = copy.deepcopy(model)
    names = dict(model.named_modules())
    for name, amax in input_amax.items():
        parent_name, _, attr = name.rpartition(".")
        parent = names[parent_name] if parent_name else model
        setattr(parent, attr, FakeQuantized(getattr(parent, attr), amax))
    return model


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """The float model inside a fake-quantized one (its trained weights), for export."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantized):
            parent_name, _, attr = name.rpartition(".")
            parent = dict(model.named_modules())[parent_name] if parent_name else model
            setattr(parent, attr, module.inner)
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm statistics stay as trained (QAD fine-tunes weights; the exported model folds these statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
