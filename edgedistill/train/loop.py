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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from edgedistill.data.loaders import eval_loader, train_loader
from edgedistill.data.splits import Split
from edgedistill.errors import CheckpointError, NonFiniteLossError
from edgedistill.files import atomic_write_text
from edgedistill.models.checkpoint import load_training_state, read_metadata, save_training_state
from edgedistill.models.predict import predict
from edgedistill.recipe.sections import DataConfig, ModelConfig
from edgedistill.train import distributed
from edgedistill.train.job import TrainJob, compute_loss
from edgedistill.train.losses import UNLABELED

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


def resolve_device(name: str) -> torch.device:
    """The recipe's ``device``; under torchrun on GPUs, this process's own CUDA device."""
    own = distributed.device(name)
    if own is not None:
        return own
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from edgedistill.errors import RecipeError

        raise RecipeError("device: cuda was asked for but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(name)


def progress_bar() -> Progress:
    """A rich progress bar on the terminal (off when stderr is not a terminal), gone when its task ends."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
        transient=True,
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


def amp_dtype(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.amp`` on ``device``; None: full precision."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


class _StudentForward(nn.Module):
    """The student's forward, seen from the module that owns every trainable parameter (the student, plus the
    feature projections when features are matched), so DistributedDataParallel averages all their gradients."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.owner = owner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        student = self.owner["student"] if isinstance(self.owner, nn.ModuleDict) else self.owner
        return student(images)


def param_groups(trainable: nn.Module, model: nn.Module, cfg: ModelConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one, or with ``cfg.layer_decay`` timm's layer-wise groups of the model
    (each carries an ``lr_scale``: the head 1, each block below ``layer_decay`` times the one above; biases and
    norms without weight decay), plus one group for whatever else trains beside it (feature projections)."""
    if not cfg.layer_decay:
        return [{"params": [p for p in trainable.parameters() if p.requires_grad]}]
    from timm.optim import param_groups_layer_decay

    from edgedistill.errors import RecipeError

    if not hasattr(model, "group_matcher"):
        raise RecipeError(
            f"layer_decay needs a timm model that names its layer groups (group_matcher); "
            f"{type(model).__name__} has none: remove layer_decay"
        )
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    own = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in trainable.parameters() if p.requires_grad and id(p) not in own]
    return groups + ([{"params": rest, "lr_scale": 1.0}] if rest else [])


def validation_scores(
    model: nn.Module, val: Split, data_cfg: DataConfig, device: torch.device, task: str = "classification"
) -> dict[str, float]:
    """``val_top1`` on ``val`` (regression: ``val_r2``, the mean over targets of R^2); under torchrun each
    process predicts its share and the sums are combined."""
    world = distributed.world()
    shard = val.subset(distributed.shard(len(val))) if world.active else val
    pred = predict(model, eval_loader(shard, data_cfg), device)
    if task != "regression":
        correct, count = distributed.sum_across(
            [float((pred.predicted == pred.labels).sum()), len(pred.labels)], device
        )
        return {"val_top1": correct / max(count, 1)}
    y, p = pred.labels.astype(np.float64), pred.logits.astype(np.float64)
    k = y.shape[1]
    sums = distributed.sum_across([len(y), *((y - p) ** 2).sum(0), *y.sum(0), *(y**2).sum(0)], device)
    n, sse, sy, syy = sums[0], np.array(sums[1 : 1 + k]), np.array(sums[1 + k : 1 + 2 * k]), np.array(sums[1 + 2 * k :])
    sst = np.maximum(syy - sy**2 / max(n, 1), 1e-12)
    return {"val_r2": float(np.mean(1 - sse / sst))}


@dataclass
class _Session:
    """One training's live objects, made once by ``_prepare`` and used by every epoch and step."""

    model: nn.Module
    trainable: nn.Module  # the model, or the model and its feature projections (one optimizer, one checkpoint)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    forward: nn.Module  # the student's forward, wrapped for DDP and compiled when asked
    loader: Any
    teacher: Optional[nn.Module]
    teacher_mode: Any  # torch.inference_mode, or torch.no_grad when features are matched
    dtype: Optional[torch.dtype]
    balance: Any
    world: Any
    use_cuda: bool
    state_path: Path
    metrics_path: Path

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


def _prepare(job: TrainJob) -> _Session:
    """Seed, devices, the frozen teacher, feature hooks, optimizer, mixed precision, DDP wrap and the loader."""
    device, hardware, teaching = job.device, job.hardware, job.teaching
    balance = job.balance.to(device) if job.balance is not None else None
    world = distributed.world()
    job.folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job.seed)
    model = job.model
    model.to(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        if world.active and hardware.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        model.to(memory_format=torch.channels_last)
    teacher = teaching.teacher if teaching is not None else None
    features = teaching.features if teaching is not None else None
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if use_cuda:
            teacher.to(memory_format=torch.channels_last)
    # the teacher's outputs never need autograd; feature targets are hooked activations, which inference-mode
    # tensors could not be saved for the feature loss's backward
    teacher_mode = torch.no_grad if features is not None else torch.inference_mode
    trainable: nn.Module = model
    if features is not None:
        features.to(device).attach(model, teacher)
        trainable = nn.ModuleDict({"student": model, "features": features})  # one optimizer, one checkpoint
    optimizer = torch.optim.AdamW(
        param_groups(trainable, model, job.cfg), lr=job.cfg.lr, weight_decay=job.cfg.weight_decay
    )
    dtype = amp_dtype(hardware.amp, device)
    # a grad scaler only for fp16, whose range needs it; bf16 has float32's exponent range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    forward: nn.Module = distributed.wrap(_StudentForward(trainable), device)
    if hardware.compile:
        forward = torch.compile(forward)  # the checkpoint keeps the plain module
    loader = train_loader(job.train, job.data, job.seed, 0, world.rank, world.size, pin_memory=use_cuda)
    return _Session(
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        scaler=scaler,
        forward=forward,
        loader=loader,
        teacher=teacher,
        teacher_mode=teacher_mode,
        dtype=dtype,
        balance=balance,
        world=world,
        use_cuda=use_cuda,
        state_path=job.folder / STATE_FILE,
        metrics_path=job.folder / METRICS_FILE,
    )


def _resume(job: TrainJob, run: _Session) -> tuple[int, list[dict[str, Any]]]:
    """(the first epoch to train, the history so far): after the last finished epoch of a checkpoint written for
    this fingerprint, else from the start; the metrics of epochs to redo are dropped."""
    start_epoch, history = 0, []
    if run.state_path.exists():
        try:
            previous = read_metadata(run.state_path).get("fingerprint")
        except CheckpointError as exc:
            log.warning("%s: cannot resume (%s); starting the stage afresh", job.label, exc)
            previous = None
        if previous == job.fingerprint:
            meta = load_training_state(run.state_path, run.trainable, run.optimizer)
            start_epoch = int(meta["epoch"]) + 1
            history = meta.get("history", [])
            log.info("%s: resuming after epoch %d/%d from %s", job.label, start_epoch, job.cfg.epochs, run.state_path)
        elif previous is not None:
            log.info("%s: recipe changed since %s was written; starting afresh", job.label, run.state_path)
    if run.world.is_main:
        if start_epoch == 0:
            run.metrics_path.unlink(missing_ok=True)
        else:
            _truncate_metrics(run.metrics_path, start_epoch)
    return start_epoch, history


def _step(job: TrainJob, run: _Session, epoch: int, i: int, batch: tuple, draw: int) -> tuple[dict, list, float]:
    """One optimizer step on one batch: (the step's mean losses over every process, [rows, correct, labelled]
    summed over the processes, the learning rate)."""
    device, cfg, teaching = job.device, job.cfg, job.teaching
    distill = teaching.distill if teaching is not None else None
    features = teaching.features if teaching is not None else None
    cache = teaching.soft_labels if teaching is not None else None
    steps_per_epoch = run.steps_per_epoch
    step = epoch * steps_per_epoch + i
    lr = lr_at(step, steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch), cfg.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay: deeper-down blocks learn slower
    images, targets = batch
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if run.use_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=run.dtype) if run.dtype is not None else nullcontext()
    with amp:
        logits = run.forward(images)
        teacher_logits = None
        if cache is not None:
            teacher_logits = cache.batch(draw, i, device, run.world.rank, run.world.size)
        elif run.teacher is not None:
            with run.teacher_mode():
                teacher_logits = run.teacher(images)
            teacher_logits = teacher_logits.float().clone()  # a normal tensor again, float32
        losses = compute_loss(
            logits.float(), targets, teacher_logits, cfg, distill, step / steps_per_epoch, job.task, run.balance
        )
        if features is not None:
            losses["feat"] = features.loss()
            losses["loss"] = losses["loss"] + teaching.feature_weight * losses["feat"]
    n = len(targets)
    hits = seen_here = 0
    if job.task != "regression":
        labeled = targets != UNLABELED
        hits, seen_here = int((logits.argmax(1) == targets)[labeled].sum()), int(labeled.sum())
    keys = sorted(losses)
    totals = distributed.sum_across([n, hits, seen_here] + [float(losses[k].detach()) * n for k in keys], device)
    global_n = totals[0]
    values = {k: v / global_n for k, v in zip(keys, totals[3:])}
    if not all(math.isfinite(v) for v in values.values()):
        kept = (
            f"the checkpoint after epoch {epoch} is kept in '{run.state_path}'"
            if epoch
            else "no epoch had finished, so there is no checkpoint yet"
        )
        raise NonFiniteLossError(
            f"{job.label}: loss became {values} at epoch {epoch + 1}, step {i + 1} (lr {lr:.2e}); {kept}. "
            f"Lower the learning rate or check the data, then run the stage again to resume."
        )
    run.optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes: weight each by its share of the global batch
    share = n * run.world.size / global_n
    run.scaler.scale(losses["loss"] * share if share != 1 else losses["loss"]).backward()
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.trainable.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return values, totals[:3], lr


def _epoch(job: TrainJob, run: _Session, epoch: int, history: list, progress: Progress, metrics) -> None:
    """Train one epoch; at a validation epoch (and the last) validate and write the resumable checkpoint."""
    cfg = job.cfg
    cache = job.teaching.soft_labels if job.teaching is not None else None
    run.model.train()
    if job.freeze_bn:
        for module in run.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    # cached soft labels: epoch e replays augmentation draw e % draws, whose teacher logits are stored
    draw = epoch % cache.draws if cache is not None else epoch
    run.loader.batch_sampler.set_epoch(draw)
    bar = progress.add_task(f"{job.label} {epoch + 1}/{cfg.epochs}", total=len(run.loader), stats="")
    sums: dict[str, float] = {}
    correct = seen = rows = 0
    started = time.perf_counter()
    lr = None
    for i, batch in enumerate(run.loader):
        values, (global_n, hits, labelled), lr = _step(job, run, epoch, i, batch, draw)
        rows += global_n
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * global_n
        correct += hits
        seen += labelled
        if metrics is not None:
            metrics.write(
                json.dumps(
                    {"kind": "step", "epoch": epoch, "step": epoch * run.steps_per_epoch + i, "lr": lr, **values}
                )
                + "\n"
            )
        progress.update(bar, advance=1, stats="  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    progress.remove_task(bar)
    checkpoint = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
    record = {"kind": "epoch", "epoch": epoch, **{k: v / max(rows, 1) for k, v in sums.items()}}
    if job.task != "regression":
        record["train_top1"] = correct / max(seen, 1)
    if checkpoint:
        record.update(validation_scores(run.model, job.val, job.data, job.device, job.task))
    record["seconds"] = round(time.perf_counter() - started, 2)
    if lr is not None:
        record["lr"] = lr  # the last step's
    history.append(record)
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    if checkpoint and run.world.is_main:
        log.info(
            "%s epoch %d/%d: %s",
            job.label,
            epoch + 1,
            cfg.epochs,
            "  ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)),
        )
        save_training_state(
            run.state_path,
            run.trainable,
            run.optimizer,
            {"epoch": epoch, "fingerprint": job.fingerprint, "history": history},
        )
    if job.on_epoch is not None and run.world.is_main:
        job.on_epoch(record)


def train_model(job: TrainJob) -> list[dict[str, Any]]:
    """Train ``job.model`` for ``job.cfg.epochs`` epochs, resuming from ``job.folder/last.safetensors`` if it fits.

    Without ``job.teaching``: cross-entropy. With it: the distillation loss against the frozen teacher, plus the
    feature term when ``teaching.features`` is set (its projections train with the model and are saved in
    the resumable state, never in the model). Rows labelled -1 in ``job.train`` are unlabeled images.

    Under torchrun every process runs this with its share of each global batch (DistributedDataParallel
    averages the gradients, weighted so the step equals one process's step on the whole batch); the logged
    losses and accuracies are sums over the processes; rank 0 alone writes metrics and checkpoints.
    """
    run = _prepare(job)
    start_epoch, history = _resume(job, run)
    if job.on_epoch is not None and run.world.is_main:
        for record in history:  # a resumed training's epochs again: a record the kill cut off reaches its hook
            job.on_epoch(record)
    features = job.teaching.features if job.teaching is not None else None
    try:
        with progress_bar() as progress, open(run.metrics_path, "a") if run.world.is_main else nullcontext() as metrics:
            for epoch in range(start_epoch, job.cfg.epochs):
                _epoch(job, run, epoch, history, progress, metrics)
    finally:
        if features is not None:
            features.detach()
    distributed.barrier()  # the checkpoint is whole before any process goes on
    return history
