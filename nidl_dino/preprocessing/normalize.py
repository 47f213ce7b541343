"""Intensity normalisation with statistics taken inside the brain mask.

MR intensities have no physical unit: their scale changes with scanner, coil and protocol.
Statistics are taken inside the brain mask so that the field of view (how much neck, air or
skull is in the image) does not change them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalize_intensity(
    data: np.ndarray, mask: np.ndarray, params: dict[str, Any]
) -> tuple[np.ndarray, dict[str, float]]:
    """Normalise intensities with in-mask statistics.

    Methods (``params["method"]``):

    - ``percentile``: with ``lo, hi`` the in-mask percentiles ``params["percentiles"]``,
      ``y = (clip(x, lo, hi) - lo) / (hi - lo)``, so in-mask values span [0, 1] exactly.
    - ``zscore``: ``y = (x - mean) / std`` with the in-mask mean and (population) standard
      deviation.
    - ``none``: ``y = x``.

    Args:
        data: float array of shape (X, Y, Z).
        mask: boolean array of the same shape, with at least one voxel.
        params: the ``normalization`` config section.

    Returns:
        ``(normalised, stats)``: float32 array of the same shape (every voxel transformed,
        mask or not), and the statistics used (``lo``, ``hi`` or ``mean``, ``std``).
    """
    method = params["method"]
    if method == "none":
        return np.asarray(data, dtype=np.float32), {}
    values = np.asarray(data[mask], dtype=np.float64)
    if method == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, params["percentiles"]))
        if hi <= lo:
            # A flat brain would divide by zero; QC rejects such scans before, keep this safe.
            hi = lo + 1.0
        out = (np.clip(data, lo, hi) - lo) / (hi - lo)
        return out.astype(np.float32), {"lo": lo, "hi": hi}
    if method == "zscore":
        mean, std = float(values.mean()), float(values.std())
        std = std if std > 0 else 1.0
        return ((data - mean) / std).astype(np.float32), {"mean": mean, "std": std}
    raise ValueError(f"unknown normalization method {method!r}")
