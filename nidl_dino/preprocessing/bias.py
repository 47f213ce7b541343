"""N4 bias-field correction (ANTs), fitted at working resolution.

The bias field is a smooth multiplicative field (a few B-spline knots across the head), so it
is estimated on the block-averaged working image (4 mm by default) and applied to the full
resolution data where they are interpolated onto the output grid: ``image / field``. N4's cost
grows with the number of voxels it fits, and fitting at 1 mm would not change a field this
smooth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nidl_dino.preprocessing.ants_bridge import to_ants_image


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
