"""A model's outputs on a loader: logits, labels and top-1, in evaluation mode without gradients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Prediction:
    logits: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def top1(self) -> float:
        return float((self.predicted == self.labels).mean()) if len(self.labels) else 0.0


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> Prediction:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    model.train(was_training)
    return Prediction(torch.cat(logits).numpy(), torch.cat(labels).numpy())
