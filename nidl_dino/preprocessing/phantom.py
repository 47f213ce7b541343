"""Synthetic T1w-like heads built from the MNI152 template, for tests and benchmarks.

The brain is the template itself; cerebrospinal fluid, skull and scalp are shells around the
template brain mask at fixed distances; the head is then placed in a "scanner" grid by a known
world transform, multiplied by a smooth bias field and given Rician-like noise. Because the
transform is known, registration and resampling can be checked against it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from nidl_dino.preprocessing.resample import resample_to_grid
from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_at

# (outer distance from the brain mask in mm, relative T1w intensity): dark CSF, dark bone,
# bright fat of the scalp. Beyond the last shell is air (0).
_SHELLS = ((3.0, 0.12), (8.0, 0.04), (13.0, 0.75))


def synthetic_head(spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A noiseless head in template space: template brain plus CSF, skull and scalp shells.

    Args:
        spacing_mm: voxel size (mm), rounded to an integer multiple of 1 mm.

    Returns:
        ``(data, affine)``: float32 array (about 197 x 233 x 189 voxels at 1 mm) with brain
        intensities 0.9 x template (so about 0.2-0.9), and its 4x4 MNI affine.
    """
    tpl, affine = template_at(spacing_mm)
    brain = tpl > BRAIN_THRESHOLD
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    head = np.where(brain, 0.9 * tpl, 0.0).astype(np.float32)
    inner = 0.0
    for outer, value in _SHELLS:
        head[(distance > inner) & (distance <= outer)] = value
        inner = outer
    return head, affine


def subject_transform(
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: tuple[float, float, float] | float = 1.0,
) -> np.ndarray:
    """A 4x4 world matrix from template to subject RAS+ mm: ``x -> R S x + t``.

    Args:
        rotation_deg: rotations about x, y, z (degrees, extrinsic, in this order).
        translation_mm: translation (mm).
        scale: per-axis or isotropic scaling (head size relative to the template).
    """
    out = np.eye(4)
    rotation = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    out[:3, :3] = rotation @ np.diag(np.broadcast_to(np.asarray(scale, dtype=float), (3,)))
    out[:3, 3] = translation_mm
    return out


def scanner_affine(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], codes: str = "RAS"
) -> np.ndarray:
    """An axis-aligned affine with the given axis codes, centred on world (0, 0, 0).

    Args:
        shape: grid shape (voxels).
        spacing_mm: voxel size per voxel axis (mm).
        codes: direction each voxel axis points to, e.g. ``"PIL"`` (a sagittal acquisition:
            first axis posterior, second inferior, third left).
    """
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for axis, code in enumerate(codes):
        world, sign = directions[code]
        affine[world, axis] = sign * spacing_mm[axis]
    center = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ center
    return affine


def synthetic_scan(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    template_to_subject: np.ndarray | None = None,
    *,
    head_spacing_mm: float = 1.0,
    bias_amplitude: float = 0.2,
    noise_sd: float = 0.02,
    scale: float = 1000.0,
    seed: int = 0,
) -> np.ndarray:
    """A T1w-like scan of the synthetic head, on a scanner grid, with bias field and noise.

    Args:
        shape: scanner grid shape (voxels).
        affine: scanner 4x4 voxel-to-world affine (subject RAS+ mm).
        template_to_subject: where the head lies: template to subject world matrix
            (None: identity, the head at its MNI position).
        head_spacing_mm: resolution of the head model (mm); coarse is faster.
        bias_amplitude: the multiplicative field is ``exp(a * smooth)`` with ``smooth`` in
            [-1, 1], a linear ramp plus a quadratic bowl across the scanner grid.
        noise_sd: noise standard deviation, relative to the brain's white matter (~0.9).
        scale: intensity scale (scanner units).
        seed: seed of the noise generator.

    Returns:
        float32 array of shape ``shape``, >= 0.
    """
    head, head_affine = synthetic_head(head_spacing_mm)
    world = np.eye(4) if template_to_subject is None else template_to_subject
    # The scan at subject point y shows the head at template point inv(world) @ y.
    image = resample_to_grid(head, head_affine, shape, affine, np.linalg.inv(world), order=1)
    u = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    ramp = 0.5 * (u[0][:, None, None] + u[1][None, :, None])
    bowl = 0.5 * (u[2][None, None, :] ** 2 + u[1][None, :, None] ** 2) - 0.5
    image *= np.exp(bias_amplitude * (ramp + bowl))
    rng = np.random.default_rng(seed)
    # Magnitude of a complex signal with Gaussian noise on both channels (Rician).
    real = image + rng.normal(0.0, noise_sd, shape).astype(np.float32)
    imag = rng.normal(0.0, noise_sd, shape).astype(np.float32)
    return (scale * np.sqrt(real * real + imag * imag)).astype(np.float32)


def save_benchmark_head(path, shape: tuple[int, int, int]) -> None:
    """Write a 1 mm T1w-like head of ``shape`` as int16 NIfTI, as a scanner would store it.

    Sagittal (PIL) storage, the head rotated (12, -8, 10 deg), shifted (6, -15, 18 mm) and
    scaled (0.95, 0.92, 0.97): the fixed input of the preprocessing and memory benchmarks.
    """
    import nibabel as nib

    affine = scanner_affine(shape, (1.0, 1.0, 1.0), "PIL")
    truth = subject_transform((12.0, -8.0, 10.0), (6.0, -15.0, 18.0), (0.95, 0.92, 0.97))
    data = synthetic_scan(shape, affine, truth, head_spacing_mm=1.0, seed=0)
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), path)
