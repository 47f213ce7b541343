"""Bias-field correction: N4 (ANTs), then a refit against the registered template's tissues.

The bias field is a smooth multiplicative field, so it is estimated on the block-averaged
working image (4 mm by default) and applied to the full resolution data where they are
interpolated onto the output grid: ``image / field``.

Two estimates, in the order the pipeline uses them:

- :func:`n4_bias_field`: N4 (Tustison et al. 2010) before registration, so that registration
  sees a flatter image. It sharpens the intensity histogram with a B-spline field and does not
  know which tissue a voxel holds: a strong field is only partly removed (README).
- :func:`template_bias_field`: after registration, the final field. The brain's voxels are
  explained as a free function of the registered template's tissue index (one level per bin: any
  contrast, any tissue intensities) times a low-order polynomial field in world coordinates,
  fitted by least squares in log intensity with the worst-fitting voxels (anatomy the template
  lacks: lesions, large ventricles, misregistered edges) trimmed. Knowing the tissues, it
  separates the field from anatomy that N4 confuses with it. Written here because neither ANTs
  nor MONAI offers a template-referenced fit; the model is the one of SPM's and FSL FAST's bias
  terms (Ashburner & Friston 2005, NeuroImage 26:839; Zhang et al. 2001, IEEE TMI 20:45), with
  the registered template's tissue maps standing in for their segmentation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from nidl_dino.preprocessing.ants_bridge import to_ants_image
from nidl_dino.preprocessing.resample import resample_to_grid
from nidl_dino.preprocessing.template import tissue_index_at


def n4_bias_field(
    data: np.ndarray, affine: np.ndarray, mask: np.ndarray, params: dict[str, Any]
) -> np.ndarray:
    """Estimate the multiplicative bias field of an image with N4.

    Args:
        data: array of shape (X, Y, Z) (the working-resolution image), intensities >= 0.
        affine: its 4x4 voxel-to-world affine (mm).
        mask: boolean array of the same shape: the voxels N4 fits (the head foreground).
        params: the ``bias_correction`` config section (``shrink_factor``, ``iterations``,
            ``convergence_threshold``, ``spline_distance_mm``).

    Returns:
        float32 array of the same shape, > 0: the field, so that ``data / field`` is corrected.
        N4's B-spline is defined over the whole image, so the field is smooth outside the mask.
    """
    import ants

    # N4 works on log intensities: zero and negative voxels (background, some reconstructions)
    # would be undefined, so they are lifted to a small positive value.
    positive = np.maximum(data, 1e-3 * float(np.percentile(data[mask], 99)))
    image = to_ants_image(positive, affine)
    weight = to_ants_image(mask.astype(np.float32), affine)
    field = ants.n4_bias_field_correction(
        image,
        mask=weight,
        shrink_factor=int(params["shrink_factor"]),
        convergence={
            "iters": [int(i) for i in params["iterations"]],
            "tol": float(params["convergence_threshold"]),
        },
        # A single number is N4's knot spacing in mm (ANTs' ``-b [distance]``).
        spline_param=int(round(float(params["spline_distance_mm"]))),
        return_bias_field=True,
    )
    field = np.asarray(field.numpy(), dtype=np.float32)
    # N4 returns the field up to a global scale; fix it to 1 on average inside the mask so
    # that the corrected intensities stay in the scanner's units.
    field /= float(np.exp(np.mean(np.log(np.maximum(field[mask], 1e-12)))))
    return np.maximum(field, 1e-6)


def _monomials(shape: tuple[int, ...], affine: np.ndarray, degree: int, centre: np.ndarray):
    """Monomials ``x^i y^j z^k`` (``1 <= i + j + k <= degree``) of world mm / 80 about ``centre``.

    Returns:
        float64 array (n_voxels, n_terms), voxels in C order.
    """
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4] - centre[:, None]) / 80.0
    terms = [
        x**i * y**j * z**k
        for i in range(degree + 1)
        for j in range(degree + 1 - i)
        for k in range(degree + 1 - i - j)
        if i + j + k > 0
    ]
    return np.stack(terms, axis=1)


def template_bias_field(
    data: np.ndarray,
    affine: np.ndarray,
    template_to_subject: np.ndarray,
    params: dict[str, Any],
    working_spacing_mm: float,
) -> np.ndarray | None:
    """The bias field of ``data`` against the registered template's tissue index.

    Model, inside the template brain mask eroded by ``erosion_mm`` (mapped to the subject):
    ``log data = g(bin of the tissue index) + sum_k c_k m_k(x)``, where ``g`` has one free level
    per tissue-index bin (``bins`` quantile bins) and ``m_k`` are the monomials of degree 1 to
    ``degree`` of the world coordinates. Least squares, refitted ``4`` times on all but the
    ``trim`` share of voxels with the largest residuals.

    Args:
        data: the working-resolution image (not bias-corrected), intensities >= 0.
        affine: its 4x4 voxel-to-world affine (subject RAS+ mm).
        template_to_subject: the registration's transform (template to subject RAS+ mm).
        params: the ``bias_correction.template_fit`` config section (``degree``, ``bins``,
            ``erosion_mm``, ``trim``).
        working_spacing_mm: resolution of the template's tissue index used (mm).

    Returns:
        float32 array of ``data``'s shape, > 0, geometric mean 1 inside the fitted voxels; None
        when too few brain voxels are in the image to fit it (then keep N4's field).
    """
    index, index_affine = tissue_index_at(working_spacing_mm)
    to_template = np.linalg.inv(template_to_subject)
    tissue = resample_to_grid(index, index_affine, data.shape, affine, to_template, order=1)
    brain = tissue > 0.5 * (1.0 / 3.0)  # at least half a voxel of CSF-or-denser brain
    voxel_mm = float(np.cbrt(abs(np.linalg.det(affine[:3, :3]))))
    erosion = int(round(float(params["erosion_mm"]) / voxel_mm))
    if erosion > 0:
        brain = ndimage.binary_erosion(brain, iterations=erosion)
    fit = brain & (data > 0)
    degree = int(params["degree"])
    n_terms = (degree + 1) * (degree + 2) * (degree + 3) // 6 - 1
    bins = int(params["bins"])
    if fit.sum() < 20 * (bins + n_terms):
        return None
    centre = (affine @ np.append(np.argwhere(fit).mean(axis=0), 1.0))[:3]
    terms = _monomials(data.shape, affine, degree, centre)
    y = np.log(data[fit].astype(np.float64))
    t = tissue[fit]
    edges = np.unique(np.quantile(t, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    level = np.digitize(t, edges)
    design = np.hstack([np.eye(len(edges) + 1)[level], terms[fit.ravel()]])
    keep = np.ones(y.size, dtype=bool)
    for _ in range(4):
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
        residual = np.abs(y - design @ coef)
        keep = residual <= np.quantile(residual, 1.0 - float(params["trim"]))
    log_field = (terms @ coef[len(edges) + 1 :]).reshape(data.shape)
    log_field -= log_field[fit].mean()
    return np.exp(log_field).astype(np.float32)
