r"""Synthetic T1w demo cohort: a small BIDS dataset with known age and sex effects.

``make_demo_dataset(out_dir)`` (or ``python -m nidl_dino.demo OUT_DIR``) writes a BIDS dataset of
T1w-like scans built from the MNI152 template shipped with nilearn (no download). Subjects differ by
anatomical effects of age and sex that a feature extractor can learn, and by nuisance that
preprocessing must undo. Same seed, same bytes.

Generative model
----------------
Notation: ``a = clip((age - 20) / 60, 0, 1.25)`` (0 at 20 years, 1 at 80), ``z ~ N(0, 1)``
independent per subject and effect and fixed across the subject's sessions; ``+`` for males and
``-`` for females where a sign is shown as ``+/-``; white matter (WM) intensity is 1.

Template (2 mm, :mod:`nidl_dino.demo.anatomy`). Grey matter ``g``, white matter ``w`` and brain mask
``b`` of the ICBM 2009a MNI152 template; CSF ``c = b - g - w``. The lateral ventricles ``V`` are the
largest CSF component (``c > 0.5``) enclosed by tissue (18 ml); ``phi`` is the signed distance
to ``V`` (mm, negative inside). The grid is extended 24 mm downwards with its last slice (a neck).

Age effects (anatomical, in template space):

1. Ventricle enlargement: ventricular CSF ``v = (1 + tanh((r - phi) / 1.5 mm)) / 2``, with the
   boundary shift ``r`` (mm) solved so that the volume is the template's times
   ``exp(1.2 a^2 + 0.3 z)``: x1 at 20, x1.35 at 50, x3.3 at 80 years (18 to 60 ml for
   ``z = 0``), individual factor ``exp(+/-0.3)``. The gained volume replaces periventricular
   tissue (WM, caudate).
2. Cortical thinning and sulcal widening: a fraction ``theta = max(0, 0.15 a + 0.03 z)`` of grey
   matter turns into CSF on the pial side: ``loss = g * min(1, theta * k * P)``, ``P`` the
   Gaussian-smoothed (sigma 2 mm) fraction of sulcal CSF and background, ``k`` normalising the
   total loss to ``theta`` (GM 994 to 827 ml, -17 %, from 20 to 80 years for ``z = 0``).
3. Grey/white contrast loss: GM intensity ``0.66 + 0.06 a + 0.025 z`` (WM = 1).

Intensity: ``I = w + I_GM g + I_CSF c + (1 - b) shell(d / s_shell)``, with ``I_CSF = 0.25 + 0.02 z``
and ``shell`` a profile of the distance ``d`` outside the brain mask: CSF 0.25 (0-1.5 mm), skull
0.08 with a 0.5 diploe band (2.5-8 mm), scalp 0.8-0.9 (9-13 mm), air 0 beyond 14.5 mm;
``s_shell ~ U(0.85, 1.2)``.

Sex effects (geometric, :mod:`nidl_dino.demo.anatomy`):

4. Head size: linear scale ``s = exp(N(ln 0.928 +/- 0.017, 0.028))`` times a per-axis factor
   ``exp(N(0, 0.02))``: intracranial volume 1505 ml on average (template 1884 ml), 10.7 % larger
   in males, 9 % SD within sex (Cohen's d about 1.1, as in real cohorts). Affine registration
   removes it.
5. Shape mode (non-affine, survives affine registration): displacement ``d_sex(m) =``
   ``alpha * sum_j e_j (m - c_j) / 20 mm * exp(1/2 - |m - c_j|^2 / (2 (20 mm)^2))``, a local
   expansion (``e_j = +1``) around frontal centres (+/-30, 35, 20) mm and a contraction (-1)
   around occipital centres (+/-25, -80, 5) mm; peak 1 mm per unit ``alpha``,
   ``alpha ~ N(+/-1.5 mm, 1.5 mm)``.

Nuisance, subject level: random smooth warp ``d_rand``, cubic interpolation of N(0, 2 mm)
control-point displacements every 32 mm. The subject's size-normalised image is
``J(m) = I(m + d_sex(m) + d_rand(m))``.

Nuisance, scan level (:mod:`nidl_dino.demo.scanner`):

6. Pose: rotation ``R = Rz Ry Rx`` with angles ``U(-15, 15)`` degrees and shift
   ``t ~ U(-15, 15)`` mm per axis, about the head centre ``c = (0, -17, 5)`` mm. World point ``p``
   shows ``J(c + S^-1 R^T (p - c - t))``, ``S`` the head-scale matrix.
7. Bias field: ``exp(sum_k beta_k q_k)``, ``q_k`` the 9 monomials of degree 1-2 of the array
   coordinates scaled to [-1, 1], ``beta_k ~ N(0, sigma_bias(site))``.
8. Noise: Rician, ``|J B + sigma_n (n_1 + i n_2)|`` with ``sigma_n(site)`` a fraction of WM.
9. Scanner scale: ``stored = gain * WM(site) * magnitude + offset(site)``,
   ``gain = exp(N(0, 0.1))``; rounded and clipped to the site's datatype (float32 values on a
   power-of-two grid of about WM / 2048).
10. Site protocol (field of view 200 x 232 x 216 mm centred on ``c``):

====== ================= ======= ======= ======== ====== ===== =========
site   voxel (mm)        axcodes dtype   WM value offset noise bias (sd)
====== ================= ======= ======= ======== ====== ===== =========
siteA  1.5 x 1.5 x 1.5   RAS     int16   1000     0      3 %   0.12
siteB  2.0 x 2.0 x 2.0   LAS     uint8   150      4      4 %   0.18
siteC  1.75 x 1.75 x 2.5 PIL     float32 2.5      0.3    2.5 % 0.15
====== ================= ======= ======= ======== ====== ===== =========

Cohort: site and sex balanced in blocks (each run of 6 subjects holds every site x sex pair once,
in random order); ages stratified uniform on 20-80 years and randomly assigned, so independent of
site and sex. With ``sessions=True`` the second session is 1-3 years later: same anatomy latents,
new pose, gain, bias and noise.

Bad scans: ``n_bad`` random subjects (their last session) get, in turn, a ``truncated`` file (the
first 40 % of the gzip stream: header readable, data not), an ``empty`` all-zero volume, a ``noise``
volume (Rician noise, no anatomy, so registration fails), a ``nan`` float32 volume. They are
ordinary entries of participants.tsv; the returned table's ``bad_scan`` column and
``demo_manifest.tsv`` (ground truth per scan: volumes, latents, pose; in ``.bidsignore``) say which.

Cohort variants (:mod:`nidl_dino.demo.variant`): everything above is the ``default`` variant.
A :class:`~nidl_dino.demo.variant.CohortVariant` (``make_demo_dataset(..., variant=...)``,
``python -m nidl_dino.demo OUT --variant NAME``, or ``demo.variant`` in config.yaml) changes the
knobs a recipe could latch onto: skull and scalp (off: skull-stripped scans, zero outside the
brain), the bias-field and noise scales (x the site's; 0 = none), the site protocols (with a
tissue-contrast exponent, ``signal ** contrast``), the gain of each age effect (1.2, 0.15 and
0.06 above; 0 removes it), a white-matter T1w signal loss ``1 - gain a`` (default gain 0) and
white-matter lesions (default none): ``Poisson(lesion_count a^2 L)`` present at age ``a``,
``L`` a log-normal subject load, mostly periventricular, growing after their onset, of T1w
intensity ``lesion_intensity``, drawn from a stream of their own. The named presets are
``default``, ``brain_only``, ``strong_bias``, ``lesions`` and ``weak_gm_contrast``; a variant
other than ``default`` writes its knobs to ``demo_variant.json``.

Randomness: streams of ``numpy.random.SeedSequence(seed, spawn_key=...)`` for the cohort design,
each subject's anatomy and each scan; files are gzip with mtime 0, so the same seed (and numpy,
scipy, nibabel versions) gives byte-identical files.
"""

from nidl_dino.demo.dataset import (
    BAD_KINDS,
    is_demo_dataset,
    make_demo_dataset,
    make_demo_subject,
    planned_files,
    recorded_variant,
)
from nidl_dino.demo.scanner import DEFAULT_SITES, SiteProtocol
from nidl_dino.demo.variant import PRESETS, CohortVariant, get_variant

__all__ = [
    "BAD_KINDS",
    "DEFAULT_SITES",
    "PRESETS",
    "CohortVariant",
    "SiteProtocol",
    "get_variant",
    "is_demo_dataset",
    "make_demo_dataset",
    "make_demo_subject",
    "planned_files",
    "recorded_variant",
]
