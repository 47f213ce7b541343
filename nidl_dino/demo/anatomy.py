"""Subject anatomy of the demo cohort, built in MNI152 template space.

The template's tissue probability maps (grey matter, white matter, brain mask; the CSF map is the
brain mask minus both) are edited per subject by the age effects (ventricle enlargement, pial-side
grey-matter loss, grey/white contrast; with a :class:`~nidl_dino.demo.variant.CohortVariant` that
asks for them, white-matter signal loss and white-matter lesions) and turned into a T1w-like
intensity image with a synthetic scalp-and-skull shell (none for a variant without skull).
The size of every age effect is a knob of the variant. The non-linear geometry (sex shape mode, random smooth warp) is applied here,
on the template grid (:func:`warped_intensity`); head size and pose are applied by
:mod:`nidl_dino.demo.scanner` when it samples the result onto a scanner grid. See
:mod:`nidl_dino.demo` for the model and its parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from nidl_dino.demo.variant import CohortVariant

# Age scale: a = (age - AGE_REF) / AGE_SPAN, 0 at 20 years, 1 at 80 years.
AGE_REF = 20.0
AGE_SPAN = 60.0

# Ventricles: ln(volume / template volume) = VENT_LOG_GAIN * a**2 + VENT_LOG_SD * z.
VENT_LOG_GAIN = 1.2
VENT_LOG_SD = 0.3
VENT_EDGE_MM = 0.75  # width of the soft ventricle boundary

# Cortex: fraction of grey matter turned into sulcal CSF = THIN_GAIN * a + THIN_SD * z, >= 0.
THIN_GAIN = 0.15
THIN_SD = 0.03
PIAL_SIGMA_MM = 2.0  # reach of the pial-side loss, as the sigma of a Gaussian (mm)

# T1w intensities relative to white matter = 1.
GM_INTENSITY = 0.66
GM_INTENSITY_AGE_GAIN = 0.06
GM_INTENSITY_SD = 0.025
CSF_INTENSITY = 0.25
CSF_INTENSITY_SD = 0.02

# Head size: ln(linear scale) ~ N(ln(HEAD_SCALE) +/- HEAD_SEX_HALF_GAP, HEAD_SD) (+ for males),
# then an independent per-axis factor exp(N(0, HEAD_AXIS_SD)).
HEAD_SCALE = 0.928
HEAD_SEX_HALF_GAP = 0.017
HEAD_SD = 0.028
HEAD_AXIS_SD = 0.02

# Sex shape mode: amplitude (mm) ~ N(+/-SEX_MODE_MEAN_MM, SEX_MODE_SD_MM) (+ for males).
SEX_MODE_MEAN_MM = 1.5
SEX_MODE_SD_MM = 1.5
SEX_MODE_SIGMA_MM = 20.0
# Centres (MNI mm) and signs of the local expansions (+) and contractions (-) of the mode.
SEX_MODE_BLOBS = (
    ((-30.0, 35.0, 20.0), 1.0),
    ((30.0, 35.0, 20.0), 1.0),
    ((-25.0, -80.0, 5.0), -1.0),
    ((25.0, -80.0, 5.0), -1.0),
)

# Random smooth warp: control points every WARP_SPACING_MM, N(0, WARP_SD_MM) per component,
# interpolated by cubic B-splines.
WARP_SPACING_MM = 32.0
WARP_SD_MM = 2.0
FIELD_STRIDE = 2  # displacement fields are tabulated every FIELD_STRIDE template voxels

# Scalp and skull: T1w intensity (white matter = 1) against distance outside the brain mask (mm).
SHELL_PROFILE_MM = (0.0, 1.5, 2.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 13.0, 14.5)
SHELL_PROFILE_VALUE = (0.25, 0.25, 0.08, 0.08, 0.5, 0.5, 0.08, 0.08, 0.9, 0.8, 0.0)
SHELL_THICKNESS_RANGE = (0.85, 1.2)

# White-matter lesions (variants with lesion_count > 0). The number of lesions present at age a is
# Poisson with mean lesion_count * a**2 * L (L = exp(LESION_LOAD_SD z - LESION_LOAD_SD**2 / 2), the
# subject's load): onsets are drawn as LESION_MAX_A * sqrt(U), a lesion stays once it appears.
LESION_MAX_A = 1.25  # the largest a of age_fraction
LESION_LOAD_SD = 0.5
LESION_RADIUS_SD = 0.3  # log-normal spread of the onset radius around lesion_radius_mm
LESION_GROWTH = 2.0  # radius multiplied by 1 + LESION_GROWTH * (a - onset): x2 after 30 years
LESION_EDGE_MM = 0.5  # width of the soft lesion boundary
# Centres: template voxels with white matter > LESION_MIN_WM, weighted by
# exp(-distance to the ventricles / LESION_PERIVENTRICULAR_MM): mostly periventricular.
LESION_MIN_WM = 0.9
LESION_PERIVENTRICULAR_MM = 10.0

# Rows of edge-replicated template slices added below the template (the neck).
_NECK_SLICES = 12
_TEMPLATE_RESOLUTION_MM = 2


@dataclass(frozen=True)
class Template:
    """MNI152 tissue maps and the fields derived from them, on a 2 mm grid extended downwards.

    Attributes:
        affine: Voxel-to-MNI (mm) affine, shape (4, 4).
        gm, wm, csf, brain: Tissue fractions in [0, 1], shape (X, Y, Z), float32.
        vent_sdf: Signed distance to the template's lateral ventricles (mm, negative inside).
        vent_band: Flat indices of voxels close enough to the ventricles to be reached.
        vent_radius_mm, vent_volume_ml: Ventricle volume as a function of the boundary shift.
        pial_proximity: Gaussian-smoothed fraction of non-ventricular CSF or background, in [0, 1].
        pial_norm: sum(gm) / sum(gm * pial_proximity), turns a global GM-loss fraction into a rate.
        head_depth: Distance outside the brain mask (mm), 0 inside.
        head_center: Centre of the brain mask's bounding box (MNI mm), the pivot of scale and pose.
    """

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    vent_sdf: np.ndarray
    vent_band: np.ndarray
    vent_radius_mm: np.ndarray
    vent_volume_ml: np.ndarray
    pial_proximity: np.ndarray
    pial_norm: float
    head_depth: np.ndarray
    head_center: np.ndarray

    @property
    def voxel_ml(self) -> float:
        """Volume of one template voxel (ml)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def brain_ml(self) -> float:
        """Volume of the brain mask, the intracranial volume before head scaling (ml)."""
        return float(self.brain.sum()) * self.voxel_ml


def _ventricle_mask(csf: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Lateral ventricles: the largest CSF component not connected to the outside of the brain."""
    fluid = (csf > 0.5) | ~brain
    labels, _ = ndi.label(fluid)
    enclosed = fluid & (labels != labels[0, 0, -1])  # a top corner: air, outside the head
    labels, n = ndi.label(enclosed)
    sizes = ndi.sum_labels(enclosed, labels, np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def ventricle_occupancy(sdf: np.ndarray, radius_mm: float) -> np.ndarray:
    """Soft ventricle fraction after moving the template boundary outwards by ``radius_mm``."""
    return 0.5 * (1.0 + np.tanh((radius_mm - sdf) / (2.0 * VENT_EDGE_MM)))


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the nilearn MNI152 2009 maps (shipped with nilearn) and derive the demo's fields.

    Returns:
        The cached :class:`Template` (a few seconds on the first call).
    """
    from nilearn import datasets

    res = _TEMPLATE_RESOLUTION_MM
    mask_img = datasets.load_mni152_brain_mask(resolution=res)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=res).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=res).dataobj, dtype=np.float32)
    brain_mask = np.asarray(mask_img.dataobj) > 0
    gm = np.clip(gm, 0.0, 1.0) * brain_mask
    wm = np.clip(wm, 0.0, 1.0) * brain_mask
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]

    pad = ((0, 0), (0, 0), (_NECK_SLICES, 0))
    gm = np.pad(gm, pad, mode="edge")
    wm = np.pad(wm, pad, mode="edge")
    brain_mask = np.pad(brain_mask, pad, mode="edge")
    affine = mask_img.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * _NECK_SLICES
    brain = brain_mask.astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    spacing = float(res)

    vent = _ventricle_mask(csf, brain_mask)
    vent_sdf = (
        ndi.distance_transform_edt(~vent, sampling=spacing)
        - ndi.distance_transform_edt(vent, sampling=spacing)
    ).astype(np.float32)
    vent_band = np.flatnonzero(vent_sdf < 12.0)
    radii = np.linspace(-2.0, 8.0, 41)
    band_sdf = vent_sdf.ravel()[vent_band]
    band_brain = brain.ravel()[vent_band]
    voxel_ml = spacing**3 / 1000.0
    volumes = np.array(
        [float(np.sum(ventricle_occupancy(band_sdf, r) * band_brain)) * voxel_ml for r in radii]
    )

    # Sulcal CSF and background, away from the ventricles: where the pial-side GM loss happens.
    outer = np.where(vent_sdf > 4.0, csf, 0.0) + (1.0 - brain)
    pial_proximity = ndi.gaussian_filter(outer, PIAL_SIGMA_MM / spacing).astype(np.float32)
    pial_norm = float(gm.sum() / (gm * pial_proximity).sum())

    head_depth = ndi.distance_transform_edt(~brain_mask, sampling=spacing).astype(np.float32)
    ijk = np.argwhere(brain_mask[:, :, _NECK_SLICES:]) + [0, 0, _NECK_SLICES]
    corners = np.stack([ijk.min(0), ijk.max(0)]).astype(float)
    head_center = (corners @ affine[:3, :3].T + affine[:3, 3]).mean(0)
    return Template(
        affine=affine,
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        vent_sdf=vent_sdf,
        vent_band=vent_band,
        vent_radius_mm=radii,
        vent_volume_ml=volumes,
        pial_proximity=pial_proximity,
        pial_norm=pial_norm,
        head_depth=head_depth,
        head_center=head_center,
    )


@dataclass(frozen=True)
class Lesion:
    """One white-matter lesion of a subject.

    Attributes:
        onset: Age (on the ``a`` scale of :func:`age_fraction`) at which it appears.
        centre_mm: Centre in template (MNI) coordinates (mm).
        radius_mm: Radius at onset (mm); it grows as ``1 + LESION_GROWTH (a - onset)``.
    """

    onset: float
    centre_mm: tuple[float, float, float]
    radius_mm: float

    def radius_at(self, a: float) -> float:
        """Radius (mm) at age ``a``; 0 before the onset."""
        if a < self.onset:
            return 0.0
        return self.radius_mm * (1.0 + LESION_GROWTH * (a - self.onset))


@dataclass(frozen=True)
class Anatomy:
    """One subject's latent anatomy: fixed across sessions, except for age.

    Attributes:
        sex: ``"M"`` or ``"F"``.
        z_vent, z_thin, z_contrast, z_csf: Standard-normal individual deviations of the age effects
            and of the CSF intensity.
        head_scale: Linear scale of the head per MNI axis (x, y, z), unitless.
        sex_mode_mm: Amplitude of the sex shape mode (mm).
        warp_coef: Control-point displacements of the random warp (mm), shape (3, I, J, K).
        shell_thickness: Multiplier of the scalp-and-skull profile's distances.
        lesions: White-matter lesions (:func:`draw_lesions`), none by default.
    """

    sex: str
    z_vent: float
    z_thin: float
    z_contrast: float
    z_csf: float
    head_scale: tuple[float, float, float]
    sex_mode_mm: float
    warp_coef: np.ndarray
    shell_thickness: float
    lesions: tuple[Lesion, ...] = ()


def _warp_control_shape(template: Template) -> tuple[int, int, int]:
    extent = np.array(template.brain.shape) * _TEMPLATE_RESOLUTION_MM
    return tuple(int(n) for n in np.ceil(extent / WARP_SPACING_MM).astype(int) + 3)


def draw_anatomy(rng: np.random.Generator, sex: str) -> Anatomy:
    """Draw a subject's latent anatomy.

    Args:
        rng: The subject's generator; draws happen in a fixed order.
        sex: ``"M"`` or ``"F"``.

    Returns:
        The :class:`Anatomy`.
    """
    sign = 1.0 if sex == "M" else -1.0
    z_vent, z_thin, z_contrast, z_csf = (float(v) for v in rng.standard_normal(4))
    log_scale = np.log(HEAD_SCALE) + sign * HEAD_SEX_HALF_GAP + HEAD_SD * rng.standard_normal()
    axes = np.exp(log_scale + HEAD_AXIS_SD * rng.standard_normal(3))
    sex_mode = sign * SEX_MODE_MEAN_MM + SEX_MODE_SD_MM * rng.standard_normal()
    shape = _warp_control_shape(load_template())
    warp_coef = (WARP_SD_MM * rng.standard_normal((3, *shape))).astype(np.float32)
    shell = rng.uniform(*SHELL_THICKNESS_RANGE)
    return Anatomy(
        sex=sex,
        z_vent=z_vent,
        z_thin=z_thin,
        z_contrast=z_contrast,
        z_csf=z_csf,
        head_scale=(float(axes[0]), float(axes[1]), float(axes[2])),
        sex_mode_mm=float(sex_mode),
        warp_coef=warp_coef,
        shell_thickness=float(shell),
    )


@functools.lru_cache(maxsize=1)
def _lesion_sites() -> tuple[np.ndarray, np.ndarray]:
    """Candidate lesion centres (template voxel indices) and their sampling probabilities."""
    tpl = load_template()
    idx = np.argwhere(tpl.wm > LESION_MIN_WM)
    weight = np.exp(-np.maximum(tpl.vent_sdf[tuple(idx.T)], 0.0) / LESION_PERIVENTRICULAR_MM)
    return idx, weight / weight.sum()


def draw_lesions(rng: np.random.Generator, variant: CohortVariant) -> tuple[Lesion, ...]:
    """Draw a subject's white-matter lesions over its life (none when ``lesion_count`` is 0).

    The expected number present at age ``a`` is ``lesion_count a^2`` times the subject's load
    ``exp(LESION_LOAD_SD z - LESION_LOAD_SD^2 / 2)`` (mean 1); centres favour periventricular
    white matter; onset radii are log-normal around ``lesion_radius_mm``.

    Args:
        rng: The subject's lesion generator (a stream of its own, so that the other draws of a
            subject do not depend on the variant).
        variant: The cohort variant (``lesion_count``, ``lesion_radius_mm``).

    Returns:
        The lesions, ordered by onset.
    """
    if variant.lesion_count <= 0:
        return ()
    load = np.exp(LESION_LOAD_SD * rng.standard_normal() - LESION_LOAD_SD**2 / 2)
    n = int(rng.poisson(variant.lesion_count * LESION_MAX_A**2 * load))
    onsets = np.sort(LESION_MAX_A * np.sqrt(rng.uniform(size=n)))
    idx, prob = _lesion_sites()
    tpl = load_template()
    voxels = idx[rng.choice(len(idx), size=n, p=prob)]
    jitter = rng.uniform(-0.5, 0.5, size=(n, 3))
    centres = (voxels + jitter) @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    radii = variant.lesion_radius_mm * np.exp(LESION_RADIUS_SD * rng.standard_normal(n))
    return tuple(
        Lesion(float(t), (float(c[0]), float(c[1]), float(c[2])), float(r))
        for t, c, r in zip(onsets, centres, radii, strict=True)
    )


def lesion_occupancy(lesions: tuple[Lesion, ...], age: float) -> tuple[np.ndarray, int]:
    """Fraction of each template voxel inside a lesion present at ``age``, and their number.

    A lesion of radius ``r`` occupies ``(1 + tanh((r - d) / (2 LESION_EDGE_MM))) / 2`` at
    distance ``d`` (mm) from its centre; overlapping lesions combine as ``1 - prod(1 - o_j)``.

    Returns:
        ``(occupancy, count)``: float32 array of the template's shape, in [0, 1], and the number
        of lesions present.
    """
    tpl = load_template()
    a = age_fraction(age)
    free = np.ones(tpl.brain.shape, np.float32)
    inv = np.linalg.inv(tpl.affine)
    spacing = float(_TEMPLATE_RESOLUTION_MM)
    count = 0
    for lesion in lesions:
        radius = lesion.radius_at(a)
        if radius <= 0:
            continue
        count += 1
        centre = inv[:3, :3] @ np.asarray(lesion.centre_mm) + inv[:3, 3]
        reach = (radius + 4 * LESION_EDGE_MM) / spacing
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, tpl.brain.shape)
        if np.any(hi <= lo):
            continue
        axes = [(np.arange(lo[k], hi[k]) - centre[k]) * spacing for k in range(3)]
        dist = np.sqrt(sum(np.meshgrid(*[x * x for x in axes], indexing="ij")))
        inside = 0.5 * (1.0 + np.tanh((radius - dist) / (2.0 * LESION_EDGE_MM)))
        box = tuple(slice(lo[k], hi[k]) for k in range(3))
        free[box] *= (1.0 - inside).astype(np.float32)
    return 1.0 - free, count


def age_fraction(age: float) -> float:
    """Age on the model's scale, (age - 20) / 60, clipped to [0, 1.25] (unitless)."""
    return float(np.clip((age - AGE_REF) / AGE_SPAN, 0.0, 1.25))


@dataclass(frozen=True)
class TissueMaps:
    """A subject's tissue fractions in template space, and their volumes in template space (ml).

    ``gm + wm + csf + lesion`` is the brain mask; ``wm`` excludes lesioned white matter.
    ``lesion`` is None (and ``lesion_ml``, ``lesion_count`` 0) without lesions.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    vent_ml: float
    gm_ml: float
    wm_ml: float
    csf_ml: float
    lesion: np.ndarray | None = None
    lesion_ml: float = 0.0
    lesion_count: int = 0


def tissue_maps(anatomy: Anatomy, age: float, variant: CohortVariant) -> TissueMaps:
    """Apply the age effects to the template's tissue maps.

    Args:
        anatomy: The subject's latent anatomy (with its lesions, if any).
        age: Age at the scan (years).
        variant: The cohort variant (``ventricle_gain``, ``thinning_gain``).

    Returns:
        The edited :class:`TissueMaps` (template space, before head scaling and warps).
    """
    tpl = load_template()
    a = age_fraction(age)
    shape = tpl.brain.shape

    # Ventricles: move the boundary to the radius whose volume matches the target.
    target = np.exp(variant.ventricle_gain * a**2 + VENT_LOG_SD * anatomy.z_vent)
    base = float(np.interp(0.0, tpl.vent_radius_mm, tpl.vent_volume_ml))
    radius = float(np.interp(target * base, tpl.vent_volume_ml, tpl.vent_radius_mm))
    band = tpl.vent_band
    sdf = tpl.vent_sdf.ravel()[band]
    brain = tpl.brain.ravel()[band]
    new_vent = np.zeros(tpl.brain.size, np.float32)
    new_vent[band] = ventricle_occupancy(sdf, radius) * brain
    old_vent = np.zeros(tpl.brain.size, np.float32)
    old_vent[band] = ventricle_occupancy(sdf, 0.0) * brain
    new_vent = new_vent.reshape(shape)
    old_vent = old_vent.reshape(shape)

    csf = 1.0 - (1.0 - tpl.csf * (1.0 - old_vent)) * (1.0 - new_vent)
    csf = np.minimum(csf, tpl.brain)
    parenchyma = tpl.gm + tpl.wm
    gm_share = np.where(parenchyma > 0.05, tpl.gm / np.maximum(parenchyma, 1e-6), 0.0)
    tissue = tpl.brain - csf
    gm = tissue * gm_share
    wm = tissue - gm

    # Cortex: pial-side GM becomes CSF, in proportion to the proximity of sulcal CSF.
    thinning = max(0.0, variant.thinning_gain * a + THIN_SD * anatomy.z_thin)
    loss = gm * np.minimum(1.0, thinning * tpl.pial_norm * tpl.pial_proximity)
    gm = gm - loss
    csf = csf + loss

    v = tpl.voxel_ml
    lesion, lesion_ml, lesion_count = None, 0.0, 0
    if anatomy.lesions:
        occupancy, lesion_count = lesion_occupancy(anatomy.lesions, age)
        lesion = (wm * occupancy).astype(np.float32)
        wm = wm - lesion
        lesion_ml = float(lesion.sum()) * v
    return TissueMaps(
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf.astype(np.float32),
        ventricles=new_vent,
        vent_ml=float(new_vent.sum()) * v,
        gm_ml=float(gm.sum()) * v,
        wm_ml=float(wm.sum()) * v,
        csf_ml=float(csf.sum()) * v,
        lesion=lesion,
        lesion_ml=lesion_ml,
        lesion_count=lesion_count,
    )


def gm_intensity(anatomy: Anatomy, age: float, variant: CohortVariant) -> float:
    """Grey-matter T1w intensity relative to young white matter: rises with age (contrast loss).

    ``0.66 + gm_intensity_gain a + 0.025 z`` (``gm_intensity_gain`` of the variant, 0.06 by
    default).
    """
    a = age_fraction(age)
    return GM_INTENSITY + variant.gm_intensity_gain * a + GM_INTENSITY_SD * anatomy.z_contrast


def wm_intensity(age: float, variant: CohortVariant) -> float:
    """White-matter T1w intensity relative to young white matter: ``1 - wm_intensity_gain a``."""
    return 1.0 - variant.wm_intensity_gain * age_fraction(age)


def template_intensity(
    anatomy: Anatomy, maps: TissueMaps, age: float, variant: CohortVariant
) -> np.ndarray:
    """T1w-like image in template space (young white matter = 1), scalp and skull included.

    Args:
        anatomy: The subject's latent anatomy.
        maps: Its tissue maps at this age.
        age: Age at the scan (years).
        variant: The cohort variant (age effects on intensity, lesion intensity; without skull
            the image is 0 outside the brain mask).

    Returns:
        Intensity image, shape of the template grid, float32.
    """
    tpl = load_template()
    csf_value = CSF_INTENSITY + CSF_INTENSITY_SD * anatomy.z_csf
    wm_value = wm_intensity(age, variant)
    wm = maps.wm if wm_value == 1.0 else np.float32(wm_value) * maps.wm
    image = wm + gm_intensity(anatomy, age, variant) * maps.gm + csf_value * maps.csf
    if maps.lesion is not None:
        image = image + np.float32(variant.lesion_intensity) * maps.lesion
    if not variant.skull:
        return image.astype(np.float32)
    # The shell starts half a voxel outside the mask, where distances start at one voxel.
    depth = np.maximum(tpl.head_depth - 0.5 * _TEMPLATE_RESOLUTION_MM, 0.0)
    shell = np.interp(
        depth / anatomy.shell_thickness, SHELL_PROFILE_MM, SHELL_PROFILE_VALUE, right=0.0
    )
    return (image + (1.0 - tpl.brain) * shell).astype(np.float32)


def _field_grid(template: Template) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (grid index -> MNI mm) and shape of the grid on which displacements are tabulated.

    Its points are every ``FIELD_STRIDE``-th template voxel, starting at the template's first.
    """
    shape = tuple(int(n) for n in (np.array(template.brain.shape) - 1) // FIELD_STRIDE + 2)
    affine = template.affine.copy()
    affine[:3, :3] *= FIELD_STRIDE
    return affine, shape


@functools.lru_cache(maxsize=1)
def sex_mode_field() -> tuple[np.ndarray, np.ndarray]:
    """Unit-amplitude sex shape mode on the field grid.

    The mode is a sum of local radial expansions (or contractions, ``sign = -1``)
    ``sign * (x - c) / s * exp(1/2 - |x - c|^2 / 2s^2)``, peak displacement 1 mm at distance ``s``
    from ``c``, around the centres of ``SEX_MODE_BLOBS``, ``s = SEX_MODE_SIGMA_MM``.

    Returns:
        ``(field, affine)``: displacement (mm), shape (3, I, J, K), and grid index -> MNI mm affine.
    """
    affine, shape = _field_grid(load_template())
    axes = [affine[k, k] * np.arange(shape[k]) + affine[k, 3] for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    field = np.zeros_like(grid)
    s = SEX_MODE_SIGMA_MM
    for centre, sign in SEX_MODE_BLOBS:
        offset = grid - np.reshape(centre, (3, 1, 1, 1))
        r2 = np.sum(offset**2, axis=0)
        field += sign * offset / s * np.exp(0.5 - r2 / (2 * s * s))
    return field.astype(np.float32), affine


def displacement_field(anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Subject's non-linear displacement (sex mode + random warp) on the field grid.

    A point ``m`` of the subject's (size-normalised) anatomy shows template point ``m + d(m)``.

    Returns:
        ``(field, affine)``: displacement (mm), shape (3, I, J, K), and grid index -> MNI mm affine.
    """
    mode, affine = sex_mode_field()
    # Control point c sits at the grid origin + (c - 1) * WARP_SPACING_MM: one beyond each side.
    per_step = FIELD_STRIDE * _TEMPLATE_RESOLUTION_MM / WARP_SPACING_MM
    coords = np.meshgrid(*[np.arange(n) * per_step + 1.0 for n in mode.shape[1:]], indexing="ij")
    warp = np.stack(
        [ndi.map_coordinates(c, coords, order=3, mode="nearest") for c in anatomy.warp_coef]
    )
    return (anatomy.sex_mode_mm * mode + warp).astype(np.float32), affine


def warped_intensity(anatomy: Anatomy, image: np.ndarray) -> np.ndarray:
    """The subject's size-normalised image: ``image(m + d(m))`` on the template grid.

    Args:
        anatomy: The subject's latent anatomy (sex mode amplitude, random warp).
        image: Template-space intensity image from :func:`template_intensity`.

    Returns:
        Warped image on the template grid, float32 (0 where ``m + d(m)`` leaves the grid).
    """
    field, _ = displacement_field(anatomy)
    shape = image.shape
    coords = list(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    for k in range(3):
        disp = _upsample_linear(field[k], FIELD_STRIDE)[: shape[0], : shape[1], : shape[2]]
        coords[k] += disp / np.float32(_TEMPLATE_RESOLUTION_MM)
    return ndi.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)


def _upsample_linear(values: np.ndarray, stride: int) -> np.ndarray:
    """Linear interpolation of a grid at every ``1/stride`` of its spacing, all axes.

    Output point ``i`` lies at input coordinate ``i / stride``; shape ``(n - 1) * stride + 1``.
    """
    out = values
    for axis in range(values.ndim):
        n = out.shape[axis]
        lo = np.take(out, np.arange(n - 1), axis=axis)
        hi = np.take(out, np.arange(1, n), axis=axis)
        steps = [lo + (hi - lo) * np.float32(f / stride) for f in range(stride)]
        inner = np.stack(steps, axis=axis + 1)
        new_shape = list(out.shape)
        new_shape[axis] = (n - 1) * stride
        inner = inner.reshape(new_shape)
        last = np.take(out, [n - 1], axis=axis)
        out = np.concatenate([inner, last], axis=axis)
    return out
