"""Site protocols and the simulated acquisition of a demo subject.

An acquisition samples the subject's template-space image (:mod:`nidl_dino.demo.anatomy`) onto the
site's voxel grid through the subject's head size, non-linear warp and head pose, then applies a
smooth multiplicative bias field, Rician noise, the scanner's gain and offset, and the site's
storage datatype. See :mod:`nidl_dino.demo` for the model and its parameters.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from nidl_dino.demo import anatomy as anat

if TYPE_CHECKING:
    from nidl_dino.demo.variant import CohortVariant

# Pose: rotation angles about x, y, z ~ U(-ROTATION_MAX_DEG, +...), shifts ~ U(-SHIFT_MAX_MM, +...).
ROTATION_MAX_DEG = 15.0
SHIFT_MAX_MM = 15.0
# Per-scan gain: exp(N(0, GAIN_LOG_SD)).
GAIN_LOG_SD = 0.1
# Field of view along the world axes x (left-right), y (posterior-anterior), z (inferior-superior).
FOV_MM = (200.0, 232.0, 216.0)
# float32 sites store multiples of a power of two close to white_matter_value / FLOAT_LEVELS.
FLOAT_LEVELS = 2048

_AXIS_OF_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0)}
_AXIS_OF_CODE.update({"S": (2, 1.0), "I": (2, -1.0)})
_DTYPES = ("int16", "uint8", "float32")


@dataclass(frozen=True)
class SiteProtocol:
    """How one site acquires and stores a T1w scan.

    Attributes:
        name: Site label, written to participants.tsv (``site`` column).
        voxel_size_mm: Voxel size along the three array axes (mm).
        axcodes: Direction of each array axis, as nibabel's ``aff2axcodes`` reports it
            (e.g. ``"RAS"``, ``"LAS"``, ``"PIL"``).
        dtype: Stored datatype: ``"int16"``, ``"uint8"`` or ``"float32"``.
        white_matter_value: Stored intensity of white matter before bias and gain.
        offset: Constant added to stored intensities.
        noise: Rician noise sigma, as a fraction of white matter.
        bias: Standard deviation of the log bias field's polynomial coefficients.
        contrast: Tissue-contrast exponent: the scan shows ``signal ** contrast`` (white matter,
            1, stays 1; above 1 grey matter and CSF get darker, as with a more T1-weighted
            sequence; below 1 brighter). 1 leaves the signal as it is.
    """

    name: str
    voxel_size_mm: tuple[float, float, float]
    axcodes: str
    dtype: str
    white_matter_value: float
    offset: float
    noise: float
    bias: float
    contrast: float = 1.0

    def __post_init__(self) -> None:
        axes = sorted(_AXIS_OF_CODE[c][0] for c in self.axcodes if c in _AXIS_OF_CODE)
        if len(self.axcodes) != 3 or axes != [0, 1, 2]:
            raise ValueError(f"site {self.name}: axcodes {self.axcodes!r} must name x, y, z once")
        if self.dtype not in _DTYPES:
            raise ValueError(f"site {self.name}: dtype {self.dtype!r} not in {_DTYPES}")
        if not self.contrast > 0:
            raise ValueError(f"site {self.name}: contrast must be > 0, got {self.contrast}")

    def grid(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """Array shape and voxel-to-world (mm) affine of this site's scans.

        The field of view is :data:`FOV_MM`, centred on the template's head centre.
        """
        rot = np.zeros((3, 3))
        shape = []
        for k, code in enumerate(self.axcodes):
            axis, sign = _AXIS_OF_CODE[code]
            rot[axis, k] = sign * self.voxel_size_mm[k]
            shape.append(int(round(FOV_MM[axis] / self.voxel_size_mm[k])))
        affine = np.eye(4)
        affine[:3, :3] = rot
        centre_index = (np.array(shape) - 1) / 2.0
        affine[:3, 3] = anat.load_template().head_center - rot @ centre_index
        return (shape[0], shape[1], shape[2]), affine


DEFAULT_SITES = (
    SiteProtocol("siteA", (1.5, 1.5, 1.5), "RAS", "int16", 1000.0, 0.0, 0.03, 0.12),
    SiteProtocol("siteB", (2.0, 2.0, 2.0), "LAS", "uint8", 150.0, 4.0, 0.04, 0.18),
    SiteProtocol("siteC", (1.75, 1.75, 2.5), "PIL", "float32", 2.5, 0.3, 0.025, 0.15),
)


@dataclass(frozen=True)
class Acquisition:
    """Per-scan nuisance: head pose, scanner gain and bias field.

    Attributes:
        rotation_deg: Rotation angles about the world x, y, z axes (degrees), applied x first.
        shift_mm: Translation of the head (mm), world x, y, z.
        gain: Multiplicative scanner gain.
        bias_coef: Coefficients of the log bias field on the monomials x, y, z, x^2, y^2, z^2,
            xy, xz, yz of the array coordinates scaled to [-1, 1].
    """

    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    gain: float
    bias_coef: tuple[float, ...]


def draw_acquisition(
    rng: np.random.Generator, site: SiteProtocol, variant: CohortVariant
) -> Acquisition:
    """Draw one scan's pose, gain and bias field (in a fixed order from ``rng``).

    The bias coefficients have standard deviation ``site.bias * variant.bias_scale``; the same
    draws happen whatever the scale, so a variant changes the field and nothing else.
    """
    rotation = rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG, 3)
    shift = rng.uniform(-SHIFT_MAX_MM, SHIFT_MAX_MM, 3)
    gain = np.exp(GAIN_LOG_SD * rng.standard_normal())
    bias = site.bias * variant.bias_scale * rng.standard_normal(9)
    return Acquisition(
        rotation_deg=tuple(float(v) for v in rotation),
        shift_mm=tuple(float(v) for v in shift),
        gain=float(gain),
        bias_coef=tuple(float(v) for v in bias),
    )


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for rotations (degrees) about the x, y and z axes."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def native_to_subject(site: SiteProtocol, anatomy: anat.Anatomy, acq: Acquisition) -> np.ndarray:
    """Affine from a site's voxel indices to the subject's size-normalised MNI coordinates (mm).

    World point ``p`` holds the anatomy point ``y = R^T (p - c - t) + c`` (undoing pose ``R``,
    ``t`` about the head centre ``c``), which is MNI point ``m = c + (y - c) / s`` (undoing the
    per-axis head scale ``s``).
    """
    _, native = site.grid()
    centre = anat.load_template().head_center
    rot = rotation_matrix(acq.rotation_deg)
    inv_scale = np.diag(1.0 / np.asarray(anatomy.head_scale))
    undo = np.eye(4)
    undo[:3, :3] = inv_scale @ rot.T
    undo[:3, 3] = centre - inv_scale @ rot.T @ (centre + np.asarray(acq.shift_mm))
    return undo @ native


def bias_field(shape: tuple[int, int, int], coef: tuple[float, ...]) -> np.ndarray:
    """Multiplicative bias ``exp(sum_k coef_k * monomial_k)`` on the array grid, float32."""
    x, y, z = (
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if a == k else 1 for a in range(3)])
        for k, n in enumerate(shape)
    )
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_b = np.zeros(shape, np.float32)
    for c, t in zip(coef, terms, strict=True):
        log_b += np.float32(c) * t
    return np.exp(log_b)


def acquire(
    site: SiteProtocol,
    anatomy: anat.Anatomy,
    acq: Acquisition,
    image: np.ndarray,
    rng: np.random.Generator,
    variant: CohortVariant,
) -> nib.Nifti1Image:
    """Simulate one scan of a subject at a site.

    Args:
        site: The site protocol (grid, orientation, datatype, intensity scale, noise, bias,
            contrast).
        anatomy: The subject's latent anatomy (head scale, warp).
        acq: The scan's pose, gain and bias coefficients.
        image: The subject's template-space intensity image (white matter = 1).
        rng: Generator for the noise.
        variant: The cohort variant (noise scale; without skull, the stored image is 0 outside
            the subject's brain mask: the template mask through the same warp, scale and pose,
            linearly interpolated, above 1/2).

    Returns:
        The scan, with the site's datatype, qform and sform set (code 1, scanner).
    """
    tpl = anat.load_template()
    shape, affine = site.grid()
    to_index = np.linalg.solve(tpl.affine, native_to_subject(site, anatomy, acq))

    def resample(template_image: np.ndarray) -> np.ndarray:
        warped = anat.warped_intensity(anatomy, template_image)
        return ndi.affine_transform(
            warped, to_index[:3, :3], to_index[:3, 3], output_shape=shape, order=1, cval=0.0
        )

    signal = resample(image)
    if site.contrast != 1.0:
        signal = np.power(signal, np.float32(site.contrast))
    signal *= bias_field(shape, acq.bias_coef)
    sigma = np.float32(site.noise * variant.noise_scale)
    real = signal + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    stored = np.float32(acq.gain * site.white_matter_value) * magnitude + np.float32(site.offset)
    if not variant.skull:
        stored = np.where(resample(tpl.brain) > 0.5, stored, np.float32(0.0))
    if site.dtype == "float32":
        # Values on a power-of-two grid (FLOAT_LEVELS per white matter) compress like integers.
        step = np.float32(2.0 ** np.floor(np.log2(site.white_matter_value / FLOAT_LEVELS)))
        stored = np.rint(stored / step) * step
    return to_nifti(stored, affine, site.dtype, f"nidl-dino demo {site.name}")


def to_nifti(data: np.ndarray, affine: np.ndarray, dtype: str, descrip: str) -> nib.Nifti1Image:
    """Round and clip ``data`` to ``dtype`` (no scaling factors) and wrap it in a NIfTI-1 image."""
    if dtype != "float32":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), 0, info.max)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def nifti_gz_bytes(img: nib.Nifti1Image) -> bytes:
    """The ``.nii.gz`` bytes of ``img``: gzip with mtime 0 and no file name, so reproducible."""
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
