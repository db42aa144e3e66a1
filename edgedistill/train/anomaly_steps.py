"""How an anomaly training's steps run on the hardware: mixed precision (``train.amp``) and torchrun's processes.

What a step learns is the method's (``train.anomaly``, ``train.efficientad``); this module only says how it runs:

- **Mixed precision**: the forward passes under ``torch.autocast`` in the dtype ``train.amp`` resolves to (the same
  rule as classification: ``auto`` is bf16 on CUDA where supported, fp16 otherwise, full precision on CPU; bf16 and
  fp16 can be asked for anywhere), the losses in float32, and fp16's gradients through a ``GradScaler`` whose state
  is part of the resumable epoch state.
- **Several processes** (``torchrun --nproc-per-node N -m edgedistill run RECIPE``): every rank draws the same
  global batch from the same generator and trains on its share (every N-th image, :meth:`StepRunner.shard`); each
  rank's loss is weighted by its share of the batch and the gradients are summed across ranks before the optimiser
  steps, so the step is the one-process step on the whole batch (exactly for losses that are means over images;
  EfficientAD's hard-feature quantile is taken per rank, and BatchNorm's batch statistics are per rank: gloo has
  no SyncBatchNorm). The gradients are summed by hand (one flattened all-reduce) rather than through
  DistributedDataParallel: EfficientAD's student runs three forward passes before one backward, which DDP's
  reducer does not expect.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from edgedistill.train import distributed
from edgedistill.train.loop import amp_dtype


class StepRunner:
    """One training's precision, processes and gradient exchange; built once per training phase."""

    def __init__(self, amp: str, device: torch.device | str):
        self.device = torch.device(device)
        self.dtype: Optional[torch.dtype] = amp_dtype(amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.world = distributed.world()

    @property
    def min_batch(self) -> int:
        """The smallest global batch a step takes: two images on every rank (BatchNorm, the losses' means)."""
        return 2 * self.world.size

    def shard(self, chunk: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch's positions (all of it in one process)."""
        return chunk[self.world.rank :: self.world.size] if self.world.active else chunk

    def autocast(self):
        """The forward passes' precision (a no-op at full precision)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer, share: float = 1.0) -> None:
        """Backward ``share * loss`` (this rank's part of the global batch's mean), sum the gradients over the
        ranks, step the optimiser through the scaler."""
        optimiser.zero_grad()
        self.scaler.scale(loss.float() * share).backward()
        if self.world.active:
            params = [p for group in optimiser.param_groups for p in group["params"] if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if self.world.backend != "nccl":
                flat = flat.cpu()
            dist.all_reduce(flat)
            flat = flat.to(params[0].device) if params else flat
            offset = 0
            for p, g in zip(params, grads):
                n = g.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        self.scaler.step(optimiser)
        self.scaler.update()

    def share(self, local: int, chunk: int) -> float:
        """This rank's weight: its images over the global batch's (1 in one process)."""
        return local / chunk if self.world.active else 1.0

    def totals(self, *values: float) -> list[float]:
        """Per-epoch sums over every rank (loss sums, image counts)."""
        return distributed.sum_across(values, self.device)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, extra: dict) -> None:
        if self.scaler.is_enabled() and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
