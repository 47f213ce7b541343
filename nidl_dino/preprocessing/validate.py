"""Checks that a loaded image is one usable 3D volume: shape, values and affine."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from nidl_dino.errors import ScanRejected

# Columns of the affine more collinear than this (|det| relative to the product of the column
# norms) make it singular for our purpose: voxel-to-world would squash a dimension.
_MIN_RELATIVE_DET = 1e-6


def describe_input(img: nib.Nifti1Image) -> dict[str, Any]:
    """Header facts for the QC record, readable even for an image that fails validation.

    Returns:
        ``shape``, ``voxel_size_mm`` (column norms of the affine), ``orientation`` (axis codes,
        e.g. ``"RAS"``), ``dtype`` (on disk) and ``affine_source`` (``sform``, ``qform`` or
        ``pixdim`` when neither is set).
    """
    header = img.header
    affine = np.asarray(img.affine, dtype=float)
    info: dict[str, Any] = {
        "shape": [int(n) for n in img.shape],
        "voxel_size_mm": [round(float(z), 4) for z in np.linalg.norm(affine[:3, :3], axis=0)],
        "dtype": str(header.get_data_dtype()),
        "affine_source": _affine_source(header),
    }
    try:
        codes = nib.aff2axcodes(affine)
    except (ValueError, np.linalg.LinAlgError):  # NaN affine; validate_image says why
        codes = (None,)
    # A singular affine leaves an axis without code (None): "?" there.
    info["orientation"] = "".join("?" if c is None else str(c) for c in codes)
    return info


def _affine_source(header: nib.Nifti1Header) -> str:
    if int(header["sform_code"]) > 0:
        return "sform"
    if int(header["qform_code"]) > 0:
        return "qform"
    return "pixdim"


def validate_image(
    img: nib.Nifti1Image, validation: dict[str, Any], path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the voxels of one 3D volume and its affine, or reject the scan with the reason.

    Args:
        img: an image from :func:`nidl_dino.preprocessing.io.read_nifti`.
        validation: the ``validation`` section of the config (voxel size range in mm, minimum
            voxels per axis, minimum field of view in mm).
        path: the file, for the error message.

    Returns:
        ``(data, affine)``: float32 array of shape (X, Y, Z) in scanner units (NIfTI scaling
        applied) and the float64 4x4 voxel-to-world (RAS+ mm) affine.

    Raises:
        ScanRejected: 2D, several volumes, too small, complex/RGB data, NaN/inf voxels,
            constant image, singular or non-finite affine, implausible voxel size.
    """
    shape = tuple(int(n) for n in img.shape)
    # Trailing singleton axes (e.g. X, Y, Z, 1 for a "4D" single volume) carry no data.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    shape_txt = "x".join(str(n) for n in img.shape)
    if len(shape) < 3 or min(shape) == 1:
        raise ScanRejected(f"2D image (shape {shape_txt}); expected a 3D volume", path)
    if len(shape) == 4:
        raise ScanRejected(f"4D image with {shape[3]} volumes; expected one 3D volume", path)
    if len(shape) > 4:
        raise ScanRejected(f"{len(shape)}D image (shape {shape_txt}); expected a 3D volume", path)

    dtype = img.header.get_data_dtype()
    if dtype.fields is not None or np.issubdtype(dtype, np.complexfloating):
        raise ScanRejected(f"{dtype} voxels (RGB or complex); expected real intensities", path)

    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, validation, path)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    min_vox = int(validation["min_voxels_per_axis"])
    if min(shape) < min_vox:
        raise ScanRejected(
            f"too small: shape {shape_txt} (at least {min_vox} voxels per axis)", path
        )
    fov = np.asarray(shape) * zooms
    if fov.min() < float(validation["min_fov_mm"]):
        raise ScanRejected(
            f"field of view {_mm(fov.min())} mm along an axis is below "
            f"{float(validation['min_fov_mm']):g} mm; expected a whole brain",
            path,
        )

    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise ScanRejected(f"contains {n_bad} NaN/inf voxels", path)
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise ScanRejected(f"constant image (all voxels {lo:g})", path)
    return data, affine


def _check_affine(affine: np.ndarray, validation: dict[str, Any], path: str | None) -> None:
    if not np.all(np.isfinite(affine)):
        raise ScanRejected("affine contains NaN/inf", path)
    linear = affine[:3, :3]
    zooms = np.linalg.norm(linear, axis=0)
    if zooms.min() == 0 or abs(np.linalg.det(linear)) < _MIN_RELATIVE_DET * np.prod(zooms):
        raise ScanRejected("singular affine", path)
    lo, hi = float(validation["min_voxel_size_mm"]), float(validation["max_voxel_size_mm"])
    for zoom in zooms:
        if not lo <= zoom <= hi:
            raise ScanRejected(
                f"implausible voxel size {_mm(zoom)} mm (allowed {lo:g}-{hi:g} mm)", path
            )


def _mm(value: float) -> str:
    """A measured length for messages: 25.0, 1.5, 0.05 (one decimal from 1 mm up)."""
    value = float(value)
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"
