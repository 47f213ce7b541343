"""The MNI152 template shipped inside nilearn (no download), at the resolutions we need.

nilearn's ``load_mni152_template`` is the skull-stripped ICBM152 2009 T1 template rescaled to
[0, 1]; ``load_mni152_brain_mask`` thresholds it at 0.2. We load the 1 mm version once per
process and derive the coarser versions from it by block averaging, which, unlike point
resampling, does not alias. Its TemplateFlow name, ``MNI152NLin2009aSym``, names the space of
the preprocessed files (:data:`nidl_dino.workflow.layout.SPACE`).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

from nidl_dino.preprocessing.resample import block_average, block_factors, resample_to_grid

#: Template intensity above which a voxel is brain (nilearn's ``load_mni152_brain_mask``).
BRAIN_THRESHOLD = 0.2


#: The file behind ``nilearn.datasets.load_mni152_template``, inside the installed package.
TEMPLATE_FILE = ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


@functools.lru_cache(maxsize=1)
def template_1mm() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 template: float32 array (197, 233, 189) in [0, 1] and its affine.

    Same voxels as ``nilearn.datasets.load_mni152_template(resolution=1)`` (the file shipped in
    nilearn, divided by its maximum), read without importing ``nilearn.datasets``: that import
    costs about 2 s, paid by every one-scan workflow job. Falls back to nilearn's function if
    the package layout changes.
    """
    spec = importlib.util.find_spec("nilearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [Path(folder, *TEMPLATE_FILE) for folder in folders]
    existing = [path for path in paths if path.is_file()]
    if existing:
        img = nib.load(existing[0])
    else:
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data /= data.max()
    data.setflags(write=False)  # shared by the cache
    return data, np.asarray(img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def template_at(spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The template block-averaged to about ``spacing_mm`` (integer factors of 1 mm).

    Returns:
        ``(data, affine)``; read-only float32 array, 4x4 affine.
    """
    data, affine = template_1mm()
    out, out_affine = block_average(data, affine, block_factors(affine, spacing_mm))
    out.setflags(write=False)
    return out, out_affine


@functools.lru_cache(maxsize=2)
def tissue_index_at(spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A tissue index of the template brain, block-averaged to about ``spacing_mm``.

    ``(1 p_CSF + 2 p_GM + 3 p_WM) / 3`` from the template's grey- and white-matter probability
    maps (nilearn's ``load_mni152_gm_template`` / ``wm_template``, shipped, no download); CSF is
    the brain mask minus both: 1/3 in pure CSF, 2/3 in grey matter, 1 in white matter, 0 outside
    the brain, partial volumes in between. Unlike the T1 template's intensities it has no smooth
    intensity variation of its own, so an image's smooth deviation from a function of it is bias
    (:func:`nidl_dino.preprocessing.bias.template_bias_field`).

    Returns:
        ``(data, affine)`` on the template's grid; read-only float32 array, 4x4 affine.
    """
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    brain = (template_1mm()[0] > BRAIN_THRESHOLD).astype(np.float32)
    gm, wm = np.minimum(gm, brain), np.minimum(wm, brain)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    index = (csf + 2.0 * gm + 3.0 * wm) / 3.0
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    out, out_affine = block_average(
        index.astype(np.float32), affine, block_factors(affine, spacing_mm)
    )
    out.setflags(write=False)
    return out, out_affine


@functools.lru_cache(maxsize=4)
def _template_on_grid(shape: tuple[int, int, int], affine_key: tuple[float, ...]) -> np.ndarray:
    grid_affine = np.asarray(affine_key).reshape(4, 4)
    spacing = float(np.linalg.norm(grid_affine[:3, 0]))
    src, src_affine = template_1mm()
    src, src_affine = block_average(
        src, src_affine, block_factors(src_affine, spacing, at_most=True)
    )
    out = resample_to_grid(src, src_affine, shape, grid_affine, order=1)
    out.setflags(write=False)
    return out


def template_on_grid(shape: tuple[int, int, int], grid_affine: np.ndarray) -> np.ndarray:
    """The template interpolated onto a template-space grid (0 outside the template's box).

    Args:
        shape: grid shape (voxels).
        grid_affine: 4x4 grid affine (MNI RAS+ mm).

    Returns:
        Read-only float32 array of shape ``shape``, cached per grid.
    """
    return _template_on_grid(tuple(int(n) for n in shape), tuple(np.ravel(grid_affine).tolist()))


@functools.lru_cache(maxsize=1)
def brain_volume_ml_1mm() -> float:
    """Volume of the template brain mask (template > 0.2) at 1 mm, in ml (about 1883)."""
    data, affine = template_1mm()
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    return float(np.count_nonzero(data > BRAIN_THRESHOLD) * voxel_ml)
