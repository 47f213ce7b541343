"""Preprocessing settings: the defaults (the ``preprocessing:`` section of config.yaml) and merging.

Every step can be switched off; the trade-offs are written next to each knob in config.yaml and
in :data:`DEFAULT_CONFIG` below.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nidl_dino.errors import UserError

#: Defaults of every preprocessing knob; ``config.yaml``'s ``preprocessing:`` section overrides
#: any subset of them (nested keys merge, lists and scalars replace).
DEFAULT_CONFIG: dict[str, Any] = {
    # Input checks; a scan failing one is excluded with the reason, never a crash.
    "validation": {
        "min_voxel_size_mm": 0.2,
        "max_voxel_size_mm": 10.0,
        "min_voxels_per_axis": 16,
        # Smallest field of view along any axis: a slab cannot be aligned to a whole brain.
        "min_fov_mm": 80.0,
    },
    # Exact axis permutation/flip to RAS+ (no interpolation). Every later step works in world
    # coordinates, so turning it off changes results only at rounding level; on, the output is
    # bit-identical whatever the storage orientation of the input.
    "reorient": True,
    # Intermediate resolution (mm) of the images that N4 and the registration see: the native
    # volume is block-averaged to it. Coarser is faster and smoother, finer is slower.
    "working_spacing_mm": 4.0,
    # Inputs already skull-stripped (many shared datasets): auto | true | false. auto calls an
    # input skull-stripped when its foreground (above Otsu's threshold) is smaller than
    # 1.25 x its eTIV (a whole head with scalp and skull: 1.5-2.5 x; a brain alone: about 0.9).
    # A skull-stripped scan takes its normalisation statistics from its own brain voxels only
    # (inside the mask, not the zeros around the brain), so that it matches the whole-head
    # acquisition of the same head.
    "skull_stripped": "auto",
    "bias_correction": {
        # N4 (ANTs). Off: intensity inhomogeneity (tens of % across the head at 3 T) stays in
        # the volume and the intensity normalisation only removes a global scale.
        "enabled": True,
        # N4 fits on the working image shrunk by this factor (4 mm x 3 = 12 mm): bias fields are
        # smooth (knots 50-100 mm apart), and N4's cost grows with the voxels it fits.
        "shrink_factor": 3,
        # Per fitting level; each level halves the B-spline knot spacing. More levels or
        # iterations fit finer fields but start to absorb anatomy (measured on our phantom).
        "iterations": [20, 20],
        "convergence_threshold": 1.0e-3,
        "spline_distance_mm": 100.0,  # B-spline knot spacing of the first level
        # Measured (README, benchmarks/bias_correction.py): under a strong x0.6-1.6 field these
        # settings leave about a quarter of it; [50, 50, 50] with 200 mm knots removes more of
        # it but changes an unbiased head as much. No setting tried leaves under 5 %.
    },
    "registration": {
        # Affine registration (ANTs) of the head to the MNI152 template of nilearn. Off: the
        # scanner coordinates are taken as MNI coordinates, which is only right for data already
        # in MNI space; the QC similarity still tells whether that holds.
        "enabled": True,
        # Rigid (6 dof) | Similarity (7: + one scale) | Affine (12: + per-axis scales and shears).
        # ANTs has no 9-dof "rigid + per-axis scaling"; Affine is its closest superset.
        "type": "Affine",
        "metric": "mattes",  # mattes (mutual information) | GC (correlation) | meansquares
        "sampling_rate": 0.25,  # fraction of the voxels sampled by the metric
        # A rigid stage first, on the whole head: an affine started far from the answer (head
        # pitched by 25 degrees) trades rotation for shear and stops in a wrong minimum.
        "rigid_first": {
            "enabled": True,
            "iterations": [200, 100],  # per level
            "shrink_factors": [4, 2],  # per level, relative to working_spacing_mm (16, 8 mm)
            "smoothing_sigmas_vox": [2, 1],  # per level, in working voxels
        },
        # Levels of the main (type) stage.
        "iterations": [100, 50],
        "shrink_factors": [2, 1],
        "smoothing_sigmas_vox": [1, 0],
        # The template is skull-stripped: over the whole image, the affine metric can match the
        # subject's scalp to the template's brain edge (heads scaled by ~1.3, 5 of 18 demo scans).
        # True restricts the main stage's metric to the template brain mask plus one working
        # voxel, so that brain matches brain (0 of 18 failed, 2x faster).
        "use_template_mask": True,
        "random_seed": 42,  # fixed seed: with one ITK thread, results are reproducible
    },
    "mask": {
        # Brain mask = MNI152 brain mask (template > 0.2) dilated, on the output grid.
        # Off: no mask, normalisation statistics over the whole field of view.
        "enabled": True,
        "dilation_mm": 4.0,  # margin for residual misalignment of an affine registration
        "keep_head": False,  # true: keep voxels outside the mask (mask still used for statistics)
    },
    "resample": {
        # Fixed grid in MNI space: shape = round(fov_mm / spacing_mm) per axis.
        "spacing_mm": 1.5,
        "fov_mm": [192.0, 192.0, 192.0],  # 128^3 at 1.5 mm, 64^3 at 3 mm
        "center_mm": [0.0, -17.0, 5.0],  # MNI centre of the grid (template brain's bounding box)
        "order": 1,  # interpolation: 1 linear, 3 cubic B-spline (slower, sharper)
        # Block-average the native volume before interpolating when the grid is coarser: avoids
        # aliasing (noise) at coarse spacings such as the demo's 3 mm.
        "antialias": True,
    },
    "normalization": {
        # percentile: clip to the in-mask percentiles, then scale them to [0, 1].
        # zscore: subtract the in-mask mean and divide by the in-mask standard deviation.
        # none: keep the (bias-corrected) scanner units, which differ between scanners.
        "method": "percentile",
        "percentiles": [0.5, 99.5],
    },
    "qc": {
        # Automatic exclusion thresholds; null turns a check off.
        # Floor for gross failures the local-optimum check cannot see (another contrast or
        # species): correlation with the template inside its brain mask, at working resolution,
        # the subject clipped to its own 2nd-98th percentiles there. Good registrations measured
        # down to 0.46 (0.5 before excluded good scans); flips and swaps are caught below.
        "min_similarity": 0.3,
        # Local-optimum check (qc.local_optimum): the similarity is evaluated one step (3 deg,
        # 3 mm, 5 % scale) either way along 9 parameters around the found transform. A converged
        # registration is at the maximum; one off by 5-10 deg / mm is not. An axis flipped (y, z)
        # or two swapped are probed too. Calibrated with benchmarks/qc_calibration.py (README).
        # Largest similarity gain of a step, a flip or a swap (good: <= 0.002, flipped >= 0.14):
        "max_optimum_gain": 0.02,
        # Largest estimated distance to the maximum (parabola per parameter): rotation (deg,
        # norm over the 3 axes), shift (mm, norm), scale (%, largest axis). Good: up to 0.9 deg,
        # 0.4 mm, 2.7 %; perturbations above 5 deg / 5 mm / 10 %: from 6 deg, 6 mm, 10 %.
        "max_optimum_offset": {"deg": 4.0, "mm": 4.0, "pct": 6.0},
        # Fraction of the brain mask falling outside the input field of view (cut-off brain).
        "max_outside_fov_fraction": 0.05,
        # In-mask 99th over 50th percentile: ~1.2-2 for T1w; near 1 is flat, large is spiky.
        "intensity_p99_over_p50": [1.05, 10.0],
        # Fraction of native voxels above the Otsu threshold (head versus background).
        "foreground_fraction": [0.02, 0.95],
    },
}

_METHODS = ("percentile", "zscore", "none")
_TRANSFORMS = ("Rigid", "Similarity", "Affine")


def merge_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge a (partial, nested) preprocessing config over :data:`DEFAULT_CONFIG`.

    Args:
        config: the ``preprocessing:`` section of config.yaml, or any subset of it.

    Returns:
        A new nested dict with every knob set.

    Raises:
        UserError: an unknown key or an invalid value, named with its dotted path.
    """
    merged = copy.deepcopy(DEFAULT_CONFIG)
    _merge_into(merged, config or {}, "preprocessing")
    _check(merged)
    return merged


#: Keys that existed once, with what to do instead (a clearer error than "unknown").
_REMOVED = {
    "preprocessing.qc.brain_volume_ml": (
        "was removed: the template's brain mask times the registration's scaling measured the "
        "template, not the subject; the head size is now the metrics.etiv_ml covariate (no bound)"
    ),
}


#: Mappings that null turns off as a whole.
_NULLABLE = {"preprocessing.qc.max_optimum_offset"}


def _merge_into(base: dict, update: Mapping, path: str) -> None:
    for key, value in update.items():
        if f"{path}.{key}" in _REMOVED:
            raise UserError(f"config key {path}.{key} {_REMOVED[f'{path}.{key}']}; delete it")
        if key not in base:
            known = ", ".join(sorted(base))
            raise UserError(f"config key {path}.{key} is unknown; expected one of: {known}")
        if isinstance(base[key], dict):
            if value is None and f"{path}.{key}" in _NULLABLE:
                base[key] = None
                continue
            if not isinstance(value, Mapping):
                raise UserError(f"config key {path}.{key} must be a mapping, got {value!r}")
            _merge_into(base[key], value, f"{path}.{key}")
        else:
            base[key] = copy.deepcopy(value)


def _check(cfg: dict) -> None:
    def fail(key: str, message: str) -> None:
        raise UserError(f"config key preprocessing.{key} {message}")

    if cfg["skull_stripped"] not in ("auto", True, False):
        fail("skull_stripped", "must be auto, true or false")
    if cfg["registration"]["type"] not in _TRANSFORMS:
        fail("registration.type", f"must be one of {', '.join(_TRANSFORMS)}")
    if cfg["normalization"]["method"] not in _METHODS:
        fail("normalization.method", f"must be one of {', '.join(_METHODS)}")
    low, high = cfg["normalization"]["percentiles"]
    if not 0 <= low < high <= 100:
        fail("normalization.percentiles", "must be [low, high] with 0 <= low < high <= 100")
    reg = cfg["registration"]
    for section, key in ((reg, "registration"), (reg["rigid_first"], "registration.rigid_first")):
        levels = {len(section[k]) for k in ("iterations", "shrink_factors", "smoothing_sigmas_vox")}
        if len(levels) != 1:
            fail(key, "needs iterations, shrink_factors and smoothing_sigmas_vox of equal length")
    if float(cfg["resample"]["spacing_mm"]) <= 0 or float(cfg["working_spacing_mm"]) <= 0:
        fail("resample.spacing_mm", "and working_spacing_mm must be positive")
    if len(cfg["resample"]["fov_mm"]) != 3 or len(cfg["resample"]["center_mm"]) != 3:
        fail("resample", "fov_mm and center_mm need three values (x, y, z)")
    if cfg["resample"]["order"] not in (0, 1, 3):
        fail("resample.order", "must be 0 (nearest), 1 (linear) or 3 (cubic)")
