"""The training loop shared by the teacher, distill and baseline stages.

One loop, two objectives: cross-entropy alone (teacher, baseline) or the distillation loss with a frozen
teacher (``teacher`` given). Per step and per epoch it logs the total, KD and CE losses to
``metrics.jsonl``; at every epoch end it writes a resumable checkpoint (model + optimizer) atomically, so a
killed run continues from its last finished epoch; a NaN/inf loss stops the stage and keeps that
checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from .checkpoint import atomic_write_text, load_training_state, read_metadata, save_training_state
from .data import Split, eval_loader, train_loader
from .errors import CheckpointError, NonFiniteLossError
from .evaluate import predict
from .errors import RecipeError
from .losses import FeatureProjector, distillation_loss, feature_loss
from .recipe import DataConfig, DistillConfig, ModelConfig

log = logging.getLogger(__name__)

STATE_FILE = "last.safetensors"
METRICS_FILE = "metrics.jsonl"


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_ratio: float = 0.01) -> float:
    """Linear warm-up, then cosine decay to ``final_ratio * base_lr``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                 cfg: ModelConfig, distill: Optional[DistillConfig]) -> dict[str, torch.Tensor]:
    if teacher_logits is None:
        ce = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        return {"loss": ce, "ce": ce}
    assert distill is not None
    out = distillation_loss(logits, teacher_logits, targets, distill.temperature, distill.alpha,
                            cfg.label_smoothing)
    return {"loss": out.total, "kd": out.kd, "ce": out.ce}


class FeatureHint(nn.Module):
    """FitNets hint for the last feature maps of timm models: a projector trained with the student.

    Student and teacher run as ``forward_features`` + ``forward_head`` so the maps come for free; the
    projector (1x1 conv + BN) maps student channels to teacher channels and is not part of the export.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, image_size: int):
        super().__init__()
        for m, role in ((model, "student"), (teacher, "teacher")):
            if not (hasattr(m, "forward_features") and hasattr(m, "forward_head")):
                raise RecipeError(f"distill.feature_weight needs timm models with forward_features/forward_head; "
                                  f"the {role} ({type(m).__name__}) has none: set distill.feature_weight=0")
        with torch.no_grad():
            probe = torch.zeros(2, 3, image_size, image_size)
            was = model.training
            model.eval()
            s_ch = model.forward_features(probe).shape[1]
            model.train(was)
            t_ch = teacher.eval().forward_features(probe).shape[1]
        self.projector = FeatureProjector(s_ch, t_ch)

    def forward(self, model, teacher, images):
        s_feat = model.forward_features(images)
        logits = model.forward_head(s_feat)
        with torch.no_grad():
            t_feat = teacher.forward_features(images)
            teacher_logits = teacher.forward_head(t_feat)
        return logits, teacher_logits, feature_loss(s_feat.float(), t_feat.float(), self.projector)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import RecipeError

        raise RecipeError("device: cuda was asked for but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(name)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not sys.stderr.isatty(), transient=True,
    )


def _truncate_metrics(path: Path, before_epoch: int) -> None:
    """Drop records of epochs that a resumed run will redo."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if record.get("epoch", 0) < before_epoch:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def train_model(model: nn.Module, train: Split, val: Split, data_cfg: DataConfig, cfg: ModelConfig,
                stage_dir: Path, seed: int, fingerprint: str, device: torch.device, label: str,
                teacher: Optional[nn.Module] = None, distill: Optional[DistillConfig] = None) -> list[dict[str, Any]]:
    """Train ``model`` for ``cfg.epochs`` epochs, resuming from ``stage_dir/last.safetensors`` if it fits."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = stage_dir / STATE_FILE, stage_dir / METRICS_FILE
    torch.manual_seed(seed)
    model.to(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    hint = None
    trainable: nn.Module = model
    if teacher is not None and distill is not None and distill.feature_weight > 0:
        hint = FeatureHint(model, teacher, data_cfg.image_size).to(device)
        trainable = nn.ModuleDict({"student": model, "hint": hint})  # one optimizer, one checkpoint for both
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda)
    steps_per_epoch = len(train_loader(train, data_cfg, seed, 0))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    start_epoch, history = 0, []
    if state_path.exists():
        try:
            previous = read_metadata(state_path).get("fingerprint")
        except CheckpointError as exc:
            log.warning("%s: cannot resume (%s); starting the stage afresh", label, exc)
            previous = None
        if previous == fingerprint:
            meta = load_training_state(state_path, trainable, optimizer)
            start_epoch = int(meta["epoch"]) + 1
            history = meta.get("history", [])
            log.info("%s: resuming after epoch %d/%d from %s", label, start_epoch, cfg.epochs, state_path)
        elif previous is not None:
            log.info("%s: recipe changed since %s was written; starting afresh", label, state_path)
    if start_epoch == 0:
        metrics_path.unlink(missing_ok=True)
    else:
        _truncate_metrics(metrics_path, start_epoch)

    amp = torch.autocast("cuda", dtype=torch.float16) if use_cuda else nullcontext()
    with _progress() as progress, open(metrics_path, "a") as metrics:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            loader = train_loader(train, data_cfg, seed, epoch)
            task = progress.add_task(f"{label} {epoch + 1}/{cfg.epochs}", total=len(loader), stats="")
            sums: dict[str, float] = {}
            correct = seen = 0
            started = time.perf_counter()
            for i, (images, targets) in enumerate(loader):
                step = epoch * steps_per_epoch + i
                lr = lr_at(step, total_steps, warmup_steps, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if use_cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with amp:
                    hint_loss = None
                    if hint is not None:
                        logits, teacher_logits, hint_loss = hint(model, teacher, images)
                    else:
                        logits = model(images)
                        teacher_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(images)
                    losses = compute_loss(logits.float(), targets, None if teacher_logits is None
                                          else teacher_logits.float(), cfg, distill)
                    if hint_loss is not None:
                        losses["feat"] = hint_loss
                        losses["loss"] = losses["loss"] + distill.feature_weight * hint_loss
                values = {k: float(v.detach()) for k, v in losses.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    kept = (f"the checkpoint after epoch {epoch} is kept in '{state_path}'" if epoch
                            else "no epoch had finished, so there is no checkpoint yet")
                    raise NonFiniteLossError(
                        f"{label}: loss became {values} at epoch {epoch + 1}, step {i + 1} (lr {lr:.2e}); {kept}. "
                        f"Lower the learning rate or check the data, then run the stage again to resume.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                n = len(targets)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                correct += int((logits.argmax(1) == targets).sum())
                seen += n
                metrics.write(json.dumps({"kind": "step", "epoch": epoch, "step": step, "lr": lr, **values}) + "\n")
                progress.update(task, advance=1, stats="  ".join(f"{k} {v:.3f}" for k, v in values.items()))
            progress.remove_task(task)
            val_top1 = predict(model, eval_loader(val, data_cfg), device).top1
            record = {"kind": "epoch", "epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()},
                      "train_top1": correct / max(seen, 1), "val_top1": val_top1,
                      "seconds": round(time.perf_counter() - started, 2)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            history.append(record)
            log.info("%s epoch %d/%d: %s", label, epoch + 1, cfg.epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))
            save_training_state(state_path, trainable, optimizer,
                                {"epoch": epoch, "fingerprint": fingerprint, "history": history})
    return history
