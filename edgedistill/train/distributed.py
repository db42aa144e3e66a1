"""Several processes, one training: PyTorch's own launcher (torchrun) and DistributedDataParallel.

``torchrun --nproc-per-node N -m edgedistill run RECIPE`` starts N copies of the command; torchrun sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and the rendezvous variables) in each. :func:`init` reads them and
joins the process group: NCCL when the processes train on CUDA, gloo on CPU. Without those variables the
world is one process and nothing here does anything, so the single-process path is the same code.

What the rest of edgedistill asks of the world: who writes (:attr:`World.is_main`: rank 0 alone writes logs,
checkpoints, reports, summaries and bundles), a barrier between stages (the other ranks read what rank 0
wrote: several machines need the run folder on a shared file system), and sums across ranks (per-step losses
and counts, validation top-1).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from edgedistill.errors import RecipeError

log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(minutes=60)  # a barrier may wait while rank 0 evaluates and exports


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    """The world this process belongs to (one process unless :func:`init` joined a torchrun group)."""
    return _world


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RecipeError(
            f"environment variable {name}={value!r} is not a whole number: it is set by torchrun; "
            f"unset it or launch with torchrun"
        ) from None


def init(device_choice: str) -> World:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1); returns the world."""
    global _world
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _world = World()
        return _world
    if dist.is_initialized():
        return _world
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    cuda = device_choice in ("auto", "cuda") and torch.cuda.is_available()
    if device_choice == "cuda" and not cuda:
        raise RecipeError("device: cuda was asked for but torch sees no CUDA device; use device: auto or cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RecipeError(
                f"torchrun started {local_size} processes on this machine but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s): lower --nproc-per-node"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    _world = World(rank=rank, local_rank=local_rank, size=size, local_size=local_size, backend=backend)
    if not cuda:  # CPU processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    log.info("distributed: rank %d of %d (local %d of %d), backend %s", rank, size, local_rank, local_size, backend)
    return _world


def shutdown() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def device(choice: str) -> Optional[torch.device]:
    """This process's CUDA device under torchrun, else None (the caller resolves the recipe's choice)."""
    if _world.active and _world.backend == "nccl":
        return torch.device("cuda", _world.local_rank)
    return None


def barrier() -> None:
    if _world.active:
        if _world.backend == "nccl":
            dist.barrier(device_ids=[_world.local_rank])
        else:
            dist.barrier()


def sum_across(values: Sequence[float], dev: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over every rank (the values themselves in one process)."""
    if not _world.active:
        return [float(v) for v in values]
    tensor = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=dev if _world.backend == "nccl" else "cpu"
    )
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard(count: int) -> list[int]:
    """The positions 0..count-1 this rank handles (every size-th, from its rank)."""
    return list(range(_world.rank, count, _world.size))


def wrap(module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when the world has several processes (itself otherwise)."""
    if not _world.active:
        return module
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # a 1x1 convolution's gradient may come with other (equally valid) strides than its weight: harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # gradients as views of the all-reduce buckets: no copy, and no stride mismatch for 1x1 convolutions
    return DistributedDataParallel(
        module, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True
    )
