"""Paired bootstrap resampling: one set of resampled image indices shared by every model or variant it compares,
so the comparison stays paired on each resample (the judge's intervals and the INT8 gates draw from here)."""

from __future__ import annotations

import numpy as np


def bootstrap_samples(n: int, samples: int = 2000, seed: int = 0) -> np.ndarray:
    """Resampled image indices, (samples, n): shared by every model so they stay paired on each resample."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))
