"""Checkpoints as safetensors, written atomically (temp file + rename), never unpickled.

A training checkpoint holds the model's tensors, the optimizer's tensors under ``optim.`` and the
loop's state (epoch, step, recipe fingerprint, optimizer hyper-parameters) as JSON metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgedistill.errors import CheckpointError

OPTIM_PREFIX = "optim."


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights) and non-contiguous views: store plain copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, Any]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"edgedistill": json.dumps(metadata or {})}
    save_file(_plain(tensors), str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable ({exc}); delete it to start that stage afresh"
        ) from exc
    return tensors, read_metadata(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("edgedistill", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({exc})") from exc


def save_model(path: Path, model: nn.Module, metadata: Optional[dict[str, Any]] = None) -> None:
    save_tensors(path, model.state_dict(), metadata)


def load_model(path: Path, model: nn.Module) -> dict[str, Any]:
    tensors, meta = load_tensors(path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit model {type(model).__name__}: "
            f"{str(exc).splitlines()[0]}; was the recipe's model changed?"
        ) from exc
    return meta


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    opt = optimizer.state_dict()
    tensors = dict(model.state_dict())
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in opt["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = dict(state, param_groups=opt["param_groups"], optim_scalars=scalars)
    save_tensors(path, tensors, meta)


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    tensors, meta = load_tensors(path)
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
    try:
        model.load_state_dict(model_tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{path}' does not fit the model: {str(exc).splitlines()[0]}") from exc
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            idx, name = key[len(OPTIM_PREFIX) :].split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.pop("optim_scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    return meta
