"""Reorientation of the voxel array to canonical RAS+, by axis permutation and flips only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt


def axis_codes(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. ``"RAS"``, ``"LPS"``, ``"PIL"`` (the direction each voxel
    axis points to, closest world axis)."""
    return "".join(str(c) for c in nib.aff2axcodes(affine))


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip the voxel axes so that they point Right, Anterior, Superior.

    No interpolation: the voxels are the same, only their storage order changes, and the
    affine changes so that every voxel keeps its world position. An oblique affine stays
    oblique (its axes are matched to the closest world axes).

    Args:
        data: array of shape (X, Y, Z).
        affine: 4x4 voxel-to-world (RAS+ mm) affine.

    Returns:
        ``(data_ras, affine_ras)``; ``data_ras`` is a C-contiguous float32 array whose shape is
        ``data``'s shape permuted.
    """
    transform = ornt.io_orientation(affine)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape)
    new_data = ornt.apply_orientation(data, transform)
    return np.ascontiguousarray(new_data, dtype=np.float32), new_affine
