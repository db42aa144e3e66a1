"""Fake quantization in PyTorch for quantization-aware distillation: the trained student with exactly what the INT8
model quantizes fake-quantized (each quantized layer's input at its activation scale, its weights per channel, and
the residual inputs of the Adds TensorRT fuses), BatchNorm statistics frozen, and unwrapped again into a plain
model for export.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from edgedistill.ship.qdq import INT8_MAX, MIN_AMAX

log = logging.getLogger(__name__)


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


def _fake_quant_per_tensor(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = (amax.clamp_min(MIN_AMAX) / INT8_MAX).float()
    return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros((), dtype=torch.int32), -128, 127)


class FakeQuantized(nn.Module):
    """A Conv2d or Linear whose input is fake-quantized per tensor with a fixed amax (the PTQ calibration's) and whose
    weight is fake-quantized per output channel by its own largest magnitudes, as the exported model will be;
    gradients pass straight through (the straight-through estimator of PyTorch's fake_quantize ops). The layer's
    own forward runs with the quantized weight, so a convolution that pads by itself (timm's ``Conv2dSame``,
    TensorFlow's "same" padding of the ``tf_*`` models) keeps its padding; zeros pad as zeros either side of the
    quantizer (symmetric INT8: zero point 0)."""

    def __init__(self, inner: nn.Module, input_amax: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("input_amax", torch.tensor(float(input_amax)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _fake_quant_per_tensor(x, self.input_amax)
        weight = _fake_quant_per_channel(self.inner.weight)
        return torch.func.functional_call(self.inner, {"weight": weight}, (x,))


class FakeQuantizedOutput(nn.Module):
    """A module whose output the INT8 model quantizes where it enters a residual Add (the Q/DQ that lets TensorRT
    fuse the addition into the convolution before it), fake-quantized per tensor with that amax."""

    def __init__(self, inner: nn.Module, output_amax: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("output_amax", torch.tensor(float(output_amax)))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _fake_quant_per_tensor(self.inner(*args, **kwargs), self.output_amax)


@dataclass
class QuantPlan:
    """What the INT8 model quantizes, for QAD: each quantized layer's input amax by module name, and the residual
    Adds' quantized inputs by ONNX tensor name with what finds them in PyTorch (the FP32 ONNX model they belong to
    and a few of its inputs: the module whose output equals the tensor there is the one fake-quantized)."""

    input_amax: dict[str, float]
    residual_amax: dict[str, float] = field(default_factory=dict)
    fp32_path: Optional[Path] = None
    sample: Optional[np.ndarray] = None

    def describe(self) -> dict[str, float]:
        """The plan's ranges, for a fingerprint."""
        return {
            **{f"module:{k}": v for k, v in self.input_amax.items()},
            **{f"residual:{k}": v for k, v in self.residual_amax.items()},
        }


def residual_modules(model: nn.Module, plan: QuantPlan) -> dict[str, float]:
    """module name -> amax for each residual tensor of ``plan``: the outermost module of ``model`` whose output on
    ``plan.sample`` equals that tensor in the FP32 ONNX model (ONNX Runtime). A tensor no module outputs (an
    operation between modules) is left out, with a warning naming it."""
    if not plan.residual_amax:
        return {}
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(plan.fp32_path))
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in plan.residual_amax if t not in have)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(plan.residual_amax)
    values = dict(zip(names, session.run(names, {session.get_inputs()[0].name: plan.sample})))
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, n=name: outputs.setdefault(n, o) if torch.is_tensor(o) else None)
        for name, module in model.named_modules()
        if name
    ]
    try:
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.from_numpy(plan.sample))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    found = {}
    for tensor, amax in plan.residual_amax.items():
        target = torch.from_numpy(values[tensor])
        atol = 1e-4 * float(target.abs().max()) + 1e-6
        matches = [n for n, o in outputs.items() if o.shape == target.shape and torch.allclose(o, target, 1e-3, atol)]
        if matches:
            found[min(matches, key=lambda n: (n.count("."), len(n)))] = amax
        else:
            log.warning("QAD: residual input %s of the INT8 model is no module's output: not fake-quantized", tensor)
    return found


def _wrap(model: nn.Module, name: str, wrapper) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, wrapper(getattr(parent, attr)))


def add_fake_quant(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """A copy of ``model`` with the modules named in ``plan.input_amax`` wrapped in :class:`FakeQuantized` and the
    modules that output a residual Add's quantized input in :class:`FakeQuantizedOutput`."""
    outputs = residual_modules(model, plan)
    model = copy.deepcopy(model)
    for name, amax in plan.input_amax.items():
        _wrap(model, name, lambda inner, a=amax: FakeQuantized(inner, a))
    for name, amax in outputs.items():  # found on the unwrapped model; a wrapped parent keeps the child's name
        _wrap(model, name, lambda inner, a=amax: FakeQuantizedOutput(inner, a))
    return model


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """The float model inside a fake-quantized one (its trained weights), for export."""
    model = copy.deepcopy(model)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, (FakeQuantized, FakeQuantizedOutput))]
    for name in sorted(wrapped, key=lambda n: -n.count(".")):  # innermost first: a wrapped block holds wrapped layers
        _wrap(model, name, lambda wrapper: wrapper.inner)
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm statistics stay as trained (QAD fine-tunes weights; the exported model folds these statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
