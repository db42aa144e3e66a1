"""Where a killed anomaly training picks up: after every epoch the networks, the optimiser, the batch-order
generator, the global random state (dropout's) and the history so far, written atomically, keyed by the recipe's
fingerprint and the training phase (``stfpm``; efficientad's ``teacher`` then ``detector``). A resumed training
ends where an uninterrupted one would (same batches, same steps); a file written for another recipe, or one that
cannot be read, is ignored with a line in the log, and the training starts afresh."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgedistill.files import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class EpochState:
    """The file (``anomaly/training.pt`` in a run) and the fingerprint of what it may resume."""

    path: Path
    fingerprint: str

    def save(self, phase: str, epoch: int, model: nn.Module, optimiser, generator: torch.Generator, **extra) -> None:
        """After ``epoch`` (1-based) of ``phase``: everything the next epoch needs."""
        buffer = io.BytesIO()
        torch.save(
            {
                "fingerprint": self.fingerprint,
                "phase": phase,
                "epoch": int(epoch),
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "rng": torch.get_rng_state(),  # dropout draws from the global generator
                **extra,
            },
            buffer,
        )
        atomic_write_bytes(self.path, buffer.getvalue())

    def load(self) -> Optional[dict]:
        """The saved state for this fingerprint, or None (no file, another recipe's, unreadable)."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            log.warning("anomaly: cannot resume from %s (%s); training afresh", self.path, exc)
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            log.info("anomaly: %s was written for another recipe; training afresh", self.path)
            return None
        return saved

    def resume(self, phase: str, model: nn.Module, optimiser, generator: torch.Generator) -> tuple[int, dict]:
        """(epochs of ``phase`` already done, the saved extras) with the model, optimiser and generator restored;
        (0, {}) when there is nothing of this phase to resume."""
        saved = self.load()
        if saved is None or saved["phase"] != phase:
            return 0, {}
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        log.info("anomaly: resuming %s after epoch %d from %s", phase, saved["epoch"], self.path)
        known = ("fingerprint", "phase", "epoch", "model", "optimiser", "generator", "rng")
        return int(saved["epoch"]), {k: v for k, v in saved.items() if k not in known}

    def phase(self) -> Optional[str]:
        saved = self.load()
        return None if saved is None else saved["phase"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
