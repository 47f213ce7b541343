"""Conversions between our arrays (NIfTI RAS+ world) and ANTs/ITK objects (LPS+ world).

NIfTI affines map voxels to RAS+ millimetres; ITK, hence ANTs, uses LPS+ physical coordinates.
The two differ by a flip of x and y, ``F = diag(-1, -1, 1)``, so that an ITK point is ``F @ x``
for a RAS point ``x``. Transforms are converted with the same flip on both sides.

ANTs is imported inside the functions so that importing the package does not initialise ITK:
ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, at its first use, and a workflow
script sets it after importing us.
"""

from __future__ import annotations

import os

import numpy as np

_FLIP = np.diag([-1.0, -1.0, 1.0])


def to_ants_image(data: np.ndarray, affine: np.ndarray):
    """An ``ants.ANTsImage`` with the voxels of ``data`` at the world positions of ``affine``.

    Args:
        data: array of shape (X, Y, Z).
        affine: 4x4 voxel-to-world (RAS+ mm) affine, possibly oblique.

    Returns:
        A float32 ANTs image whose spacing, origin and direction encode ``affine`` in LPS+.
    """
    import ants

    linear = _FLIP @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=[float(v) for v in _FLIP @ affine[:3, 3]],
        spacing=[float(v) for v in spacing],
        direction=linear / spacing,
    )


def ants_transform_to_ras(tx) -> np.ndarray:
    """The 4x4 RAS+ world matrix of an ANTs affine-family transform.

    ITK's affine maps ``p`` to ``M (p - c) + c + t`` (matrix ``M``, centre ``c``, translation
    ``t``, all LPS); in RAS this is ``F M F x + F (c - M c + t)``.

    Args:
        tx: an ``ants.ANTsTransform`` of an affine family (Affine, Rigid, Similarity, ...).

    Returns:
        float64 array of shape (4, 4) mapping RAS+ mm to RAS+ mm, in the direction of ``tx``.
    """
    params = np.asarray(tx.parameters, dtype=np.float64)
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    center = np.asarray(tx.fixed_parameters, dtype=np.float64)[:3]
    out = np.eye(4)
    out[:3, :3] = _FLIP @ matrix @ _FLIP
    out[:3, 3] = _FLIP @ (center - matrix @ center + translation)
    return out


def write_ras_transform(matrix_ras: np.ndarray, path: str | os.PathLike) -> None:
    """Write a 4x4 RAS+ world matrix as an ITK/ANTs ``AffineTransform_float_3_3`` (.mat) file.

    ``ants.read_transform(path)`` reads it back; ``antsApplyTransforms -t path`` uses it.
    """
    import ants

    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="float",
        dimension=3,
        matrix=_FLIP @ matrix_ras[:3, :3] @ _FLIP,
        translation=_FLIP @ matrix_ras[:3, 3],
        center=(0.0, 0.0, 0.0),
    )
    ants.write_transform(tx, str(path))


def read_ras_transform(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK/ANTs affine .mat file as a 4x4 RAS+ world matrix (inverse of the writer)."""
    import ants

    return ants_transform_to_ras(ants.read_transform(str(path)))
