"""Affine registration of a head to the MNI152 template with ANTs (``ants.registration``).

Why ANTsPy rather than SimpleITK: ANTs' rigid-then-affine registration with mutual information
is what the field's pipelines run (fMRIPrep, ``antsRegistrationSyN``); its transform files are
plain ITK files that antsApplyTransforms, ANTsPy, ITK and SimpleITK all read back; and ANTsPy
ships N4 too, so one library serves both steps. It is not faster per se (a single affine stage
at 2 mm took about twice as long as SimpleITK's here): speed comes from registering at working
resolution (4 mm by default), enough to fit 12 parameters over a whole head to a fraction of a
millimetre.

Two stages: a rigid one on the whole head (it cannot scale, and the head's outline guides it
from large initial rotations), then the affine one with its metric restricted to the template's
brain mask (the template is skull-stripped; over the whole image, the affine can fit the
subject's scalp to the template's brain edge).

Conventions: the transform returned maps template world points (MNI RAS+ mm) to subject world
points, which is ITK's convention for a transform that resamples the subject onto the
template (``antsApplyTransforms -r template -i subject -t xfm``). A subject point goes to
MNI through its inverse.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nidl_dino.preprocessing.ants_bridge import (
    ants_transform_to_ras,
    to_ants_image,
    write_ras_transform,
)
from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_at


def register_to_template(
    data: np.ndarray,
    affine: np.ndarray,
    params: dict[str, Any],
    working_spacing_mm: float,
    initial: np.ndarray | None = None,
    score: Callable[[np.ndarray], float] | None = None,
) -> np.ndarray:
    """Fit the affine-family transform between the MNI152 template and a subject image.

    After the rigid stage, the main stage starts once per ``params["start_scales"]`` entry
    (default 1: the rigid result as it is), from the rigid result with the template shrunk by
    that factor about the MNI origin, and the start whose result ``score``s highest is kept; a
    later start replaces the first only when it scores more than ``params["start_margin"]``
    higher (two runs to the same optimum differ by about 0.001 in similarity; ch2's whole-head,
    skull-stripped and 0.5 mm files: under 0.0005).
    From the rigid result alone, the affine can inflate the template's brain until it meets the
    subject's scalp (a local optimum: 6 of 144 tune-set demo scans, eTIV 1.3-2.6x too large);
    started 10 % smaller, it converges inside the skull (5 of those 6; the others' results are
    unchanged).

    Args:
        data: subject array of shape (X, Y, Z), ideally bias-corrected, at about
            ``working_spacing_mm`` resolution.
        affine: its 4x4 voxel-to-world (RAS+ mm) affine.
        params: the ``registration`` config section (``type``, ``metric``, ``sampling_rate``,
            ``iterations``, ``shrink_factors``, ``smoothing_sigmas_vox``,
            ``use_template_mask``, ``random_seed``).
        working_spacing_mm: resolution of the template used as the fixed image (mm).
        initial: a transform (template to subject RAS+ mm) to start from, e.g. a first pass's;
            the rigid stage and the other start scales are then skipped (None: from the
            centres of mass, rigid first).
        score: transform -> similarity, to choose among several start scales (needed when
            there are several).

    Returns:
        float64 array (4, 4): template RAS+ mm to subject RAS+ mm.
    """
    import ants

    tpl, tpl_affine = template_at(working_spacing_mm)
    fixed = to_ants_image(tpl, tpl_affine)
    moving = to_ants_image(data, affine)
    mask = None
    if params["use_template_mask"]:
        # One working voxel of margin: the metric must see the brain's edge.
        brain = ndimage.binary_dilation(tpl > BRAIN_THRESHOLD, iterations=1)
        mask = to_ants_image(brain.astype(np.float32), tpl_affine)
    common = {
        "fixed": fixed,
        "moving": moving,
        "aff_metric": str(params["metric"]),
        "aff_sampling": 32,  # histogram bins of the Mattes metric
        "aff_random_sampling_rate": float(params["sampling_rate"]),
        "random_seed": None if params["random_seed"] is None else int(params["random_seed"]),
    }
    rigid_first = initial is None and params["rigid_first"]["enabled"]
    rigid_first = rigid_first and params["type"] != "Rigid"
    scales = [float(f) for f in params["start_scales"]] if rigid_first else [1.0]
    if len(scales) > 1 and score is None:
        raise ValueError("register_to_template: several start_scales need a score function")

    def stage(kind: str, levels: dict[str, Any], stage_mask, start: str | None, name: str) -> str:
        result = ants.registration(
            type_of_transform=kind,
            mask=stage_mask,
            initial_transform=start,
            outprefix=str(Path(tmp) / name),
            aff_iterations=tuple(int(n) for n in levels["iterations"]),
            aff_shrink_factors=tuple(int(n) for n in levels["shrink_factors"]),
            aff_smoothing_sigmas=tuple(float(s) for s in levels["smoothing_sigmas_vox"]),
            **common,
        )
        # With an initial transform, ANTs writes the composition (initial then stage).
        return result["fwdtransforms"][0]

    def ras(path: str) -> np.ndarray:
        return ants_transform_to_ras(ants.read_transform(path))

    with tempfile.TemporaryDirectory(prefix="nidl_dino_reg_") as tmp:
        # None: ANTs starts from the alignment of the centres of mass.
        start = None
        if initial is not None:
            start = str(Path(tmp) / "initial.mat")
            write_ras_transform(initial, start)
        elif rigid_first:
            start = stage("Rigid", params["rigid_first"], None, None, "rigid_")
        best, best_score = None, -np.inf
        for i, factor in enumerate(scales):
            begin = start
            if start is not None and factor != 1.0:
                # ANTs' own file as it is for factor 1 (a rewritten one changes its path to the
                # optimum slightly); else the template shrunk about the MNI origin
                scaled = ras(start)
                scaled[:3, :3] *= factor
                begin = str(Path(tmp) / f"start{i}.mat")
                write_ras_transform(scaled, begin)
            result = ras(stage(str(params["type"]), params, mask, begin, f"main{i}_"))
            value = score(result) if len(scales) > 1 else 0.0
            # another start must beat the first by the margin (equal optima differ by ~1e-3)
            margin = 0.0 if best is None else float(params["start_margin"])
            if best is None or value > best_score + margin:
                best, best_score = result, value
        return best


#: FreeSurfer's eTIV scale factor (ml): the intracranial volume of a head whose transform to
#: MNI305 has determinant 1 (``eTIV = 1948.106 cm3 / det(talairach.xfm)``, ``mri_segstats``;
#: the method of Buckner et al. 2004, NeuroImage 23:724-738, "A unified approach for morphometric
#: and functional data analysis in young, old, and demented adults using automated atlas-based
#: head size normalization: reliability and validation against manual measurement of total
#: intracranial volume"). MNI152 2009 was built by 9-parameter registration to MNI305, so a
#: transform to it has the same scale. Heads in MNI space are larger than real ones: an average
#: adult's transform to MNI has a determinant of about 1.2-1.35, so it reads about 1450-1600 ml.
ETIV_SCALE_ML = 1948.106


def scaling_determinant(template_to_subject: np.ndarray) -> float:
    """Volume ratio subject/template of a world transform: ``|det|`` of its linear part."""
    return float(abs(np.linalg.det(template_to_subject[:3, :3])))


def etiv_ml(template_to_subject: np.ndarray) -> float:
    """Estimated total intracranial volume (ml) from the affine, as FreeSurfer's eTIV.

    ``eTIV = ETIV_SCALE_ML * |det(A)|`` with ``A`` the linear part of the template-to-subject
    transform (the inverse of FreeSurfer's subject-to-MNI305 ``talairach.xfm``, hence the
    product instead of the quotient). A head-size covariate, not a segmentation: it measures how
    much the template had to be scaled, so it is only meaningful for a successful registration
    and no volume bound is applied to it.
    """
    return ETIV_SCALE_ML * scaling_determinant(template_to_subject)
