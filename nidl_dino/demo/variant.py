"""Cohort variants: the generator's knobs, as one frozen dataclass, and named presets.

A feature-learning recipe tuned on one synthetic cohort can latch onto what that cohort happens
to offer: a scalp to register, one bias strength, three particular scanners, age shown mostly by
grey-matter intensity. :class:`CohortVariant` makes each of those a knob, so an evaluation can
tune on some variants and report on others (``benchmarks/feature_quality.py --split``).
``make_demo_dataset(..., variant=...)`` passes it on to :mod:`nidl_dino.demo.anatomy` (age
effects, lesions, skull) and :mod:`nidl_dino.demo.scanner` (bias, noise, site protocols).

The defaults are the demo as it always was: ``CohortVariant()`` (preset ``default``) writes the
same bytes as a call without a variant.

Presets (:data:`PRESETS`, ``python -m nidl_dino.demo OUT --variant NAME``):

================= ==============================================================================
preset            changes from ``default``
================= ==============================================================================
default           none
brain_only        skull-stripped scans (zero outside the brain), half the bias, the
                  :data:`BRAIN_ONLY_SITES` (1-1.2 mm voxels, anisotropic; RAS/LPS/PIL; int16 and
                  float32; other tissue contrasts)
strong_bias       bias field coefficients x2.5 (brain's field about x0.6-1.6, 1st-99th
                  percentile, for the median scan) and twice the noise
lesions           white-matter lesions (T1-hypointense, count and size rising with age: 25 on
                  average at 80 years), white-matter T1 signal falling with age (-6 % at 80),
                  stronger ventricle growth (x4.5 at 80), a third of the grey-matter intensity
                  change
weak_gm_contrast  no grey-matter intensity change with age: age shows only in morphology
================= ==============================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nidl_dino.demo import anatomy as anat
from nidl_dino.demo.scanner import DEFAULT_SITES, SiteProtocol


@dataclass(frozen=True)
class CohortVariant:
    """What the demo generator can vary besides the seed; every default is today's demo.

    Attributes:
        name: Label of the variant (recorded in the dataset; not a knob).
        skull: Whole heads (scalp, skull, neck) if true; if false, skull-stripped scans: the
            anatomy has no shell and every voxel outside the subject's brain mask is stored as 0.
        bias_scale: Multiplies each site's bias-field coefficient standard deviation
            (``SiteProtocol.bias``); 0 gives a flat field (exactly 1).
        noise_scale: Multiplies each site's Rician noise sigma (``SiteProtocol.noise``);
            0 gives noise-free magnitudes.
        sites: Site protocols (voxel size, axis order, datatype, intensity scale, noise, bias,
            tissue contrast); subjects are spread evenly across them.
        ventricle_gain: Age gain of the log ventricle volume, ``ln(V / V_template) = gain a^2 +
            0.3 z`` (unitless; 1.2: x3.3 at 80 years). 0 removes the age effect.
        thinning_gain: Fraction of grey matter turned into sulcal CSF per unit ``a`` (0.15: -15 %
            at 80 years). 0 removes the age effect.
        gm_intensity_gain: Rise of the grey-matter T1w intensity per unit ``a`` (WM = 1; 0.06:
            0.66 -> 0.72 from 20 to 80 years). 0 removes the age effect.
        wm_intensity_gain: Fall of the white-matter T1w intensity per unit ``a`` (young WM = 1;
            0.06: 0.94 at 80 years). 0 (default) keeps white matter at 1.
        lesion_count: Mean number of white-matter lesions at 80 years; the expected count at age
            ``a`` is ``lesion_count a^2``, each lesion grows after its onset. 0: no lesions.
        lesion_radius_mm: Median radius of a lesion at its onset (mm); it grows by that much
            again every 30 years.
        lesion_intensity: T1w intensity of lesioned white matter (young WM = 1): below 1
            hypointense (as T1 shows white-matter hyperintensities), above 1 hyperintense.
    """

    name: str = "default"
    skull: bool = True
    bias_scale: float = 1.0
    noise_scale: float = 1.0
    sites: tuple[SiteProtocol, ...] = DEFAULT_SITES
    ventricle_gain: float = anat.VENT_LOG_GAIN
    thinning_gain: float = anat.THIN_GAIN
    gm_intensity_gain: float = anat.GM_INTENSITY_AGE_GAIN
    wm_intensity_gain: float = 0.0
    lesion_count: float = 0.0
    lesion_radius_mm: float = 2.0
    lesion_intensity: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        for key in ("bias_scale", "noise_scale", "lesion_count"):
            if not getattr(self, key) >= 0:
                raise ValueError(
                    f"variant {self.name}: {key} must be >= 0, got {getattr(self, key)}"
                )
        for key in ("lesion_radius_mm", "lesion_intensity"):
            if not getattr(self, key) > 0:
                raise ValueError(
                    f"variant {self.name}: {key} must be > 0, got {getattr(self, key)}"
                )
        if not self.sites or len({s.name for s in self.sites}) != len(self.sites):
            raise ValueError(
                f"variant {self.name}: sites must be a non-empty sequence of protocols with "
                "distinct names"
            )

    def replace(self, **changes: Any) -> CohortVariant:
        """A copy with ``changes`` (knob name -> value), e.g. from command-line flags."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every knob as JSON-ready values (sites as lists of dicts)."""
        return dataclasses.asdict(self)


#: Sites of the ``brain_only`` preset: other voxel sizes (about 1 mm, anisotropic), axis orders,
#: datatypes, intensity scales and tissue contrasts than :data:`DEFAULT_SITES`.
BRAIN_ONLY_SITES = (
    SiteProtocol("siteD", (1.0, 1.0, 1.2), "LPS", "int16", 800.0, 0.0, 0.02, 0.12, 1.0),
    SiteProtocol("siteE", (1.2, 1.2, 1.2), "RAS", "float32", 1.0, 0.0, 0.03, 0.15, 1.25),
    SiteProtocol("siteF", (1.2, 1.0, 1.0), "PIL", "int16", 2000.0, 10.0, 0.025, 0.15, 0.85),
)

#: Named sets of site protocols (``--sites`` of the command line).
SITE_SETS: dict[str, tuple[SiteProtocol, ...]] = {
    "default": DEFAULT_SITES,
    "brain_only": BRAIN_ONLY_SITES,
}

DEFAULT_VARIANT = CohortVariant()

#: Named variants (see the module docstring).
PRESETS: dict[str, CohortVariant] = {
    "default": DEFAULT_VARIANT,
    "brain_only": CohortVariant(
        name="brain_only", skull=False, bias_scale=0.5, sites=BRAIN_ONLY_SITES
    ),
    "strong_bias": CohortVariant(name="strong_bias", bias_scale=2.5, noise_scale=2.0),
    "lesions": CohortVariant(
        name="lesions",
        lesion_count=25.0,
        wm_intensity_gain=0.06,
        ventricle_gain=1.5,
        gm_intensity_gain=0.02,
    ),
    "weak_gm_contrast": CohortVariant(name="weak_gm_contrast", gm_intensity_gain=0.0),
}


def get_variant(variant: str | CohortVariant | None) -> CohortVariant:
    """The preset of that name, the variant itself, or the default for None.

    Raises:
        ValueError: An unknown preset name (the message lists the known ones).
    """
    if variant is None:
        return DEFAULT_VARIANT
    if isinstance(variant, CohortVariant):
        return variant
    try:
        return PRESETS[str(variant)]
    except KeyError:
        raise ValueError(
            f"unknown demo variant {variant!r}; choose one of {', '.join(PRESETS)}"
        ) from None
