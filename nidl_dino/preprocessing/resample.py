"""Resampling: block averaging to a coarser grid and interpolation onto the fixed MNI grid.

All mappings go through world coordinates (RAS+ mm): a grid voxel ``g`` of affine ``G`` is at
world point ``G @ g`` in template space, which the registration maps to the subject's world
point ``T @ G @ g``, which is the subject voxel ``inv(A) @ T @ G @ g``. One interpolation per
output, whatever the steps before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


def block_factors(affine: np.ndarray, target_mm: float, *, at_most: bool = False) -> list[int]:
    """Integer block sizes (voxels per axis) that bring the voxel size close to ``target_mm``.

    Args:
        affine: 4x4 voxel-to-world affine (voxel sizes are its column norms, mm).
        target_mm: wanted voxel size (mm).
        at_most: round down instead of to the nearest, so the blocks never exceed the target
            (used for anti-aliasing, which must not blur more than the output grid does).

    Returns:
        One factor >= 1 per axis.
    """
    ratios = float(target_mm) / np.linalg.norm(affine[:3, :3], axis=0)
    rounded = np.floor(ratios + 1e-6) if at_most else np.round(ratios)
    return [max(1, int(r)) for r in rounded]


def block_average(
    data: np.ndarray, affine: np.ndarray, factors: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of ``factors`` voxels (a box filter, then subsampling).

    Trailing voxels that do not fill a block are dropped (less than one block, at the edge).

    Args:
        data: array of shape (X, Y, Z).
        affine: its 4x4 voxel-to-world affine.
        factors: block size per axis (voxels).

    Returns:
        ``(averaged, new_affine)``: float32 array of shape (X // fx, Y // fy, Z // fz); the new
        voxel ``i`` is centred on the old voxels ``fx * i .. fx * i + fx - 1``, i.e. at old
        index ``fx * i + (fx - 1) / 2``, which the new affine encodes exactly.
    """
    f = [int(v) for v in factors]
    if f == [1, 1, 1]:
        return np.asarray(data, dtype=np.float32), affine.copy()
    n = [s // k for s, k in zip(data.shape, f, strict=True)]
    if min(n) == 0:
        raise ValueError(f"blocks {f} larger than the image {data.shape}")
    cropped = data[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    blocks = cropped.reshape(n[0], f[0], n[1], f[1], n[2], f[2])
    averaged = blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = [(k - 1) / 2 for k in f]
    return averaged, affine @ scale


def output_grid(resample: dict[str, Any]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The fixed output grid in MNI space: axis-aligned RAS+, isotropic.

    Args:
        resample: the ``resample`` config section (``spacing_mm``, ``fov_mm``, ``center_mm``).

    Returns:
        ``(shape, affine)``: shape ``round(fov_mm / spacing_mm)`` per axis, and the 4x4 affine
        whose voxel centres are symmetric about ``center_mm``.
    """
    spacing = float(resample["spacing_mm"])
    shape = tuple(max(1, int(round(float(f) / spacing))) for f in resample["fov_mm"])
    center = np.asarray(resample["center_mm"], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = center - spacing * (np.asarray(shape) - 1) / 2
    return shape, affine  # type: ignore[return-value]


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    grid_shape: tuple[int, int, int],
    grid_affine: np.ndarray,
    template_to_subject: np.ndarray | None = None,
    *,
    order: int = 1,
    mode: str = "constant",
) -> np.ndarray:
    """Interpolate a subject volume at the world positions of a template-space grid.

    Args:
        data: subject array of shape (X, Y, Z).
        affine: its 4x4 voxel-to-world affine (subject RAS+ mm).
        grid_shape: output shape (voxels).
        grid_affine: output 4x4 voxel-to-world affine (template RAS+ mm).
        template_to_subject: 4x4 world matrix from template to subject RAS+ mm (the
            registration's forward transform); None for the identity.
        order: spline order, 0 nearest, 1 linear, 3 cubic.
        mode: outside the input, ``"constant"`` gives 0, ``"nearest"`` the edge value.

    Returns:
        float32 array of shape ``grid_shape``.
    """
    world = np.eye(4) if template_to_subject is None else template_to_subject
    vox2vox = np.linalg.inv(affine) @ world @ grid_affine
    return ndimage.affine_transform(
        np.asarray(data, dtype=np.float32),
        vox2vox[:3, :3],
        vox2vox[:3, 3],
        output_shape=tuple(grid_shape),
        order=order,
        mode=mode,
        cval=0.0,
        prefilter=order > 1,
    )


def inside_fov(
    grid_shape: tuple[int, int, int],
    grid_affine: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    template_to_subject: np.ndarray | None = None,
) -> np.ndarray:
    """Which grid voxels fall inside the input image's field of view.

    Args:
        grid_shape: output grid shape (voxels).
        grid_affine: 4x4 affine of the grid (template space).
        shape: shape of the input image (voxels).
        affine: 4x4 affine of the input image (subject space).
        template_to_subject: 4x4 world matrix, None for the identity.

    Returns:
        Boolean array of shape ``grid_shape``; a voxel's extent is its index +- 0.5.
    """
    world = np.eye(4) if template_to_subject is None else template_to_subject
    vox2vox = np.linalg.inv(affine) @ world @ grid_affine
    # Separable sums of 1D ranges: no (3, X, Y, Z) index array in memory.
    axes = np.ix_(*(np.arange(n, dtype=np.float64) for n in grid_shape))
    inside = np.ones(tuple(grid_shape), dtype=bool)
    for k in range(3):
        coord = vox2vox[k, 3] + sum(vox2vox[k, j] * axes[j] for j in range(3))
        inside &= (coord >= -0.5) & (coord <= shape[k] - 0.5)
    return inside
