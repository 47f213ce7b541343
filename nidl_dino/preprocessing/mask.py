"""Masks: the head foreground of a native image and the brain mask on the template grid."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_on_grid


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of the histogram that maximises the between-class variance.

    Args:
        values: intensities (any shape).
        bins: histogram bins between the minimum and the maximum.

    Returns:
        The threshold, in the units of ``values``.
    """
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][np.argmax(between)])


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Head (not air) voxels: above Otsu's threshold, holes filled.

    Args:
        data: array of shape (X, Y, Z), e.g. the working-resolution image.

    Returns:
        Boolean array of the same shape.
    """
    mask = data > otsu_threshold(data)
    return ndimage.binary_fill_holes(mask)


def brain_mask_on_grid(
    shape: tuple[int, int, int], grid_affine: np.ndarray, dilation_mm: float = 0.0
) -> np.ndarray:
    """The MNI152 brain mask (template > 0.2) on the output grid, dilated by ``dilation_mm``.

    The dilation is by Euclidean distance in mm: a voxel is added when its centre lies within
    ``dilation_mm`` of a mask voxel's centre (a ball of that radius, whatever the spacing).
    Cached per grid: it depends on the template only.

    Args:
        shape: grid shape (voxels).
        grid_affine: 4x4 grid affine (MNI RAS+ mm).
        dilation_mm: margin added around the mask (mm); 0 for none.

    Returns:
        Read-only boolean array of shape ``shape``.
    """
    key = tuple(np.ravel(grid_affine).tolist())
    return _brain_mask(tuple(int(n) for n in shape), key, float(dilation_mm))


@functools.lru_cache(maxsize=8)
def _brain_mask(
    shape: tuple[int, int, int], affine_key: tuple[float, ...], dilation_mm: float
) -> np.ndarray:
    grid_affine = np.asarray(affine_key).reshape(4, 4)
    brain = template_on_grid(shape, grid_affine) > BRAIN_THRESHOLD
    if dilation_mm > 0:
        spacing = np.linalg.norm(grid_affine[:3, :3], axis=0)
        # The ball as a structuring element: the same set as thresholding a Euclidean distance
        # transform, at a third of its cost.
        reach = np.floor(dilation_mm / spacing + 1e-9).astype(int)
        offsets = np.meshgrid(*(np.arange(-k, k + 1) for k in reach), indexing="ij")
        ball = (
            sum((o * s) ** 2 for o, s in zip(offsets, spacing, strict=True))
            <= dilation_mm**2 + 1e-9
        )
        brain = ndimage.binary_dilation(brain, structure=ball)
    brain.setflags(write=False)
    return brain
