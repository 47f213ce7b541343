"""3D multi-crop views for DINO, built from MONAI transforms.

DINO learns from views: each volume gives 2 large *global* crops and ``num_local_crops`` small
*local* crops, each randomly resized, flipped, optionally affinely jittered, and changed in
intensity with per-view probabilities (DINO's asymmetric recipe on photographs sets them per view
kind; the defaults here, tuned on registered brains, use the same ones for every view: see
config.yaml and the README's Feature quality section).

:class:`MultiCropTransform` takes one volume ``(C, D, H, W)`` and returns the list
``[g1, g2, l1, ..., lN]``; the default collate of a ``DataLoader`` turns a batch of these into
``[g1, g2, l1, ..., lN]`` with each entry ``(B, C, D, H, W)``, the batch format of
:class:`nidl_dino.DINO`. The same transform runs on any device (CPU workers, or a batch with
:meth:`MultiCropTransform.batch_views`, volume by volume). ``data.views_on_device`` uses
:class:`nidl_dino.views.device.DeviceViews` instead: the same recipe in batched torch operations
with no host synchronisation.

Written here because MONAI lacks them (everything else is MONAI's):

- :class:`RandResizedCrop3d`: a crop whose *volume* is a random fraction of the input's and
  whose sides are jittered in aspect, then resized to a fixed size (torchvision's
  ``RandomResizedCrop`` in 3D); MONAI's random crops draw each side independently.
- :class:`RandRelativeGaussianNoise` and :class:`RandBiasField3d`: MONAI's ``RandGaussianNoise``
  and ``RandBiasField`` draw their fields with NumPy in float64 on the CPU (20 and 13 ms at 96^3
  here, and a host round trip for a GPU tensor); these draw them with torch on the input's device.

Reproducibility: every random transform owns its random state (MONAI's ``Randomizable``);
``MultiCropTransform.set_random_state(seed)`` seeds all of them, and ``monai.data.DataLoader``
seeds each worker from the loader's generator (``worker_init_fn``), so a seeded loader repeats
its views and workers draw different ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianSmooth,
    Randomizable,
    RandomizableTransform,
    Resize,
    SpatialCrop,
    Transform,
)
from monai.utils import MAX_SEED, convert_to_tensor, ensure_tuple_rep

from nidl_dino.errors import UserError
from nidl_dino.settings import defaults

__all__ = [
    "DEFAULT_VIEWS_CONFIG",
    "MultiCropTransform",
    "RandBiasField3d",
    "RandRelativeGaussianNoise",
    "RandResizedCrop3d",
]

#: The ``views:`` section's defaults, read from the schema (:mod:`nidl_dino.settings`): for the
#: demo (~64^3 T1w volumes). Sizes are in voxels, scales are fractions of the input volume
#: (voxel count), probabilities given as ``[global_1, global_2, local]``. For ~128^3 volumes use
#: 96 / 48.
DEFAULT_VIEWS_CONFIG: dict[str, Any] = defaults("views")


class RandResizedCrop3d(Randomizable, Transform):
    """Random crop of a random fraction of the volume, with aspect jitter, resized to ``size``.

    The crop volume is ``scale`` (drawn uniformly in the range) times the input's voxel count;
    each side is the input's side times ``scale ** (1/3)`` times a stretch factor drawn
    log-uniformly in ``aspect_ratio`` (the three factors renormalised to a product of 1, so the
    stretch keeps the volume). Draws where a side would exceed the input are retried (10 times,
    as torchvision does), then the sides are clipped to the input. The position is uniform over
    all crops that lie inside the input; with ``in_foreground``, the crop is instead centred on
    a voxel drawn uniformly among the input's non-zero voxels (any channel), then shifted inside
    the input where it would cross its edge (a volume without non-zero voxels: uniform).

    Args:
        size: output spatial size ``(D, H, W)`` in voxels (an int for a cube).
        scale: range of the crop volume as a fraction of the input volume, in (0, 1].
        aspect_ratio: range of the per-axis stretch factors (e.g. ``(0.8, 1.25)``; ``(1, 1)``
            keeps the input's proportions).
        mode: interpolation mode of MONAI's ``Resize`` (``"trilinear"``, ``"area"``, ...).
        in_foreground: centre each crop on a non-zero voxel of the input (preprocessed volumes
            are zero outside the dilated brain mask: crops then show brain, not background).

    Shape:
        ``(C, D_in, H_in, W_in)`` -> ``(C, *size)``.

    Attributes:
        box: ``(start, stop)`` voxel indices of the last crop, per spatial axis.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.4, 1.0),
        aspect_ratio: Sequence[float] = (0.8, 1.25),
        mode: str = "trilinear",
        in_foreground: bool = False,
    ) -> None:
        self.size = tuple(int(s) for s in ensure_tuple_rep(size, 3))
        self.in_foreground = bool(in_foreground)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_aspect = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
        self.resize = Resize(self.size, mode=mode)
        self.box: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def randomize(self, spatial_shape: Sequence[int], img: torch.Tensor | None = None) -> None:
        shape = np.asarray(spatial_shape, dtype=float)
        for _ in range(10):
            log_stretch = self.R.uniform(*self.log_aspect, size=3)
            stretch = np.exp(log_stretch - log_stretch.mean())
            sides = np.round(shape * self.R.uniform(*self.scale) ** (1 / 3) * stretch)
            if np.all(sides <= shape):
                break
        sides = np.clip(sides, 1, shape).astype(int)
        centre = self._foreground_voxel(img) if self.in_foreground and img is not None else None
        if centre is None:
            start = [
                int(self.R.randint(0, n - s + 1))
                for n, s in zip(shape.astype(int), sides, strict=True)
            ]
        else:
            start = [
                int(min(max(c - s // 2, 0), n - s))
                for c, s, n in zip(centre, sides, shape.astype(int), strict=True)
            ]
        self.box = (tuple(start), tuple(int(a + s) for a, s in zip(start, sides, strict=True)))

    def _foreground_voxel(self, img: torch.Tensor) -> tuple[int, ...] | None:
        """A voxel index drawn uniformly among the non-zero voxels of ``img`` (None: none)."""
        nonzero = torch.as_tensor(img).ne(0).any(dim=0).flatten().nonzero().flatten()
        if nonzero.numel() == 0:
            return None
        flat = int(nonzero[int(self.R.randint(0, nonzero.numel()))])
        return tuple(int(i) for i in np.unravel_index(flat, tuple(img.shape[1:])))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize or self.box is None:
            self.randomize(img.shape[1:], img)
        start, stop = self.box
        return self.resize(SpatialCrop(roi_start=start, roi_end=stop)(img))


class _DeviceIntensityTransform(RandomizableTransform):
    """An intensity transform applied with probability ``prob``, computed on the image's device.

    Subclasses draw their parameters in ``randomize`` and change the tensor in ``_apply``.
    """

    def _apply(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return self._apply(torch.as_tensor(img))


class RandRelativeGaussianNoise(_DeviceIntensityTransform):
    """Additive Gaussian noise with a std relative to the image's, drawn on the image's device.

    With probability ``prob``, adds ``N(0, sigma^2)`` with ``sigma`` drawn uniformly in
    ``[0, std * image.std()]``, so the strength does not depend on how volumes were normalised.

    Args:
        prob: probability of adding noise.
        std: maximal noise std as a fraction of the image's intensity std.

    Shape:
        ``(C, D, H, W)`` -> same.
    """

    def __init__(self, prob: float = 0.1, std: float = 0.1) -> None:
        _DeviceIntensityTransform.__init__(self, prob)
        self.std = float(std)
        self._fraction = 0.0
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._fraction = self.R.uniform(0.0, self.std)
        self._seed = int(self.R.randint(MAX_SEED))

    def _apply(self, img: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=img.device).manual_seed(self._seed)
        noise = torch.randn(img.shape, generator=gen, device=img.device, dtype=img.dtype)
        return img + noise * (self._fraction * img.std())


class RandBiasField3d(_DeviceIntensityTransform):
    """Multiplicative smooth bias field ``exp(sum c_ijk P_i(z) P_j(y) P_k(x))``, on the device.

    Same model as MONAI's ``RandBiasField``: Legendre polynomials ``P`` of total degree
    ``<= degree`` over ``[-1, 1]`` per axis, coefficients uniform in ``[-coeff, coeff]``.

    Args:
        prob: probability of applying a field.
        degree: maximal total degree of the polynomial (>= 1).
        coeff: maximal absolute coefficient (0.2 gives fields of roughly +-40 %).

    Shape:
        ``(C, D, H, W)`` -> same.
    """

    def __init__(self, prob: float = 0.1, degree: int = 3, coeff: float = 0.2) -> None:
        _DeviceIntensityTransform.__init__(self, prob)
        self.degree = int(degree)
        self.coeff = float(coeff)
        n = self.degree + 1
        i, j, k = np.meshgrid(range(n), range(n), range(n), indexing="ij")
        self._mask = (i + j + k) <= self.degree
        self._coeffs = np.zeros((n, n, n))

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._coeffs = np.zeros(self._mask.shape)
        self._coeffs[self._mask] = self.R.uniform(-self.coeff, self.coeff, self._mask.sum())

    def _legendre(self, n: int, like: torch.Tensor) -> torch.Tensor:
        x = torch.linspace(-1.0, 1.0, n, device=like.device, dtype=like.dtype)
        polys = [torch.ones_like(x), x]
        for d in range(1, self.degree):  # Bonnet's recursion
            polys.append(((2 * d + 1) * x * polys[d] - d * polys[d - 1]) / (d + 1))
        return torch.stack(polys[: self.degree + 1])  # (degree + 1, n)

    def _apply(self, img: torch.Tensor) -> torch.Tensor:
        coeffs = torch.as_tensor(self._coeffs, device=img.device, dtype=img.dtype)
        pz, py, px = (self._legendre(n, img) for n in img.shape[1:])
        field = torch.einsum("ijk,id,jh,kw->dhw", coeffs, pz, py, px)
        return img * torch.exp(field)


@contextmanager
def _without_metadata() -> Iterator[None]:
    """MONAI's MetaTensor bookkeeping off for the block (views need no affine or history).

    It costs 10-20 % of the view time on the CPU and most of the per-call overhead on a GPU.
    MONAI only offers the process-wide switch; it is restored on exit.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, key: str) -> dict:
    """Deep-merge a (partial) user mapping over the defaults; unknown keys are a UserError."""
    out = copy.deepcopy(dict(defaults))
    for k, v in (given or {}).items():
        if k not in out:
            raise UserError(f"views.{key}: unknown key {k!r}; known keys: {', '.join(out)}")
        out[k] = _merge(out[k], v, f"{key}.{k}") if isinstance(out[k], Mapping) else v
    return out


def _range(value: Any, key: str, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"views.{key}: expected [min, max], got {value!r}") from None
    if not low <= a <= b <= high:
        raise UserError(f"views.{key}: [{a}, {b}] must satisfy {low} <= min <= max <= {high}")
    return a, b


def _is_prob(value: Any) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _prob(value: Any, key: str) -> float:
    if not _is_prob(value):
        raise UserError(f"views.{key}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def _probs(value: Any, key: str) -> tuple[float, float, float]:
    probs = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(probs) != 3 or not all(_is_prob(p) for p in probs):
        raise UserError(
            f"views.{key}: expected 3 probabilities in [0, 1] for [global_1, global_2, local], "
            f"got {value!r}"
        )
    return tuple(float(p) for p in probs)


def _size(value: Any, key: str) -> tuple[int, int, int]:
    size = ensure_tuple_rep(value, 3) if isinstance(value, int) else tuple(value)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise UserError(f"views.{key}: expected an int or [D, H, W] positive ints, got {value!r}")
    return size


class MultiCropTransform(Randomizable, Transform):
    """Make DINO's ``2 + num_local_crops`` views of one volume, globals first.

    Each view is: :class:`RandResizedCrop3d` to its size, then ``RandFlip`` per listed axis,
    an optional ``RandAffine`` (rotation and scaling at the view's size), then intensity
    changes in acquisition order: bias field, gamma (``RandAdjustContrast``), Gaussian
    smoothing (``RandGaussianSmooth``, sigma in voxels of the view), Gaussian noise. Each
    intensity change has its own probability for global view 1, global view 2 and local views.

    Args:
        global_size: global view size ``(D, H, W)`` in voxels (an int for a cube).
        local_size: local view size in voxels.
        num_local_crops: number N of local views (0 allowed).
        global_scale: range of a global crop's volume as a fraction of the input volume.
        local_scale: same for local crops.
        aspect_ratio: range of the per-axis stretch of a crop (see :class:`RandResizedCrop3d`).
        local_in_brain: centre each local crop on a non-zero voxel of the volume (inside the
            dilated brain mask of a preprocessed volume) instead of anywhere in it.
        flip: ``{prob, axes}``: each listed spatial axis (0 = D, the left-right axis of RAS
            volumes) is flipped independently with ``prob``.
        affine: ``{prob, rotate_deg, scale}``: rotation up to +-``rotate_deg`` degrees and
            scaling by up to +-``scale`` (fraction) per axis; ``prob: 0`` skips it (it costs as
            much as the crop).
        intensity: each entry has ``prob``, a list ``[global_1, global_2, local]``:
            ``bias_field: {prob, degree, coeff}`` (:class:`RandBiasField3d`: Legendre
            polynomial of total degree <= ``degree``, coefficients in +-``coeff``);
            ``gamma: {prob, range}`` (intensities rescaled to [0, 1], raised to a gamma drawn
            in ``range``, rescaled back); ``smooth: {prob, sigma}`` (Gaussian sigma per axis
            drawn in the ``sigma`` range, voxels of the view); ``noise: {prob, std}``
            (:class:`RandRelativeGaussianNoise`: std up to ``std`` times the view's std).
            Partial mappings are merged over :data:`DEFAULT_VIEWS_CONFIG`.
        **unknown: rejected with a :class:`UserError` naming the key.

    Input:
        one volume ``(C, D, H, W)`` (torch tensor on any device, or NumPy array).

    Returns:
        ``[g1, g2, l1, ..., lN]``: float32 tensors ``(C, *global_size)`` then
        ``(C, *local_size)``, on the input's device.

    Raises:
        UserError: for a bad or unknown key, naming it as ``views.<key>``.

    Example:
        >>> views = MultiCropTransform(**DEFAULT_VIEWS_CONFIG).set_random_state(0)
        >>> [tuple(v.shape) for v in views(torch.rand(1, 64, 64, 64))][:3]
        [(1, 48, 48, 48), (1, 48, 48, 48), (1, 24, 24, 24)]
    """

    def __init__(
        self,
        global_size: int | Sequence[int] = DEFAULT_VIEWS_CONFIG["global_size"],
        local_size: int | Sequence[int] = DEFAULT_VIEWS_CONFIG["local_size"],
        num_local_crops: int = DEFAULT_VIEWS_CONFIG["num_local_crops"],
        global_scale: Sequence[float] = DEFAULT_VIEWS_CONFIG["global_scale"],
        local_scale: Sequence[float] = DEFAULT_VIEWS_CONFIG["local_scale"],
        aspect_ratio: Sequence[float] = DEFAULT_VIEWS_CONFIG["aspect_ratio"],
        local_in_brain: bool = DEFAULT_VIEWS_CONFIG["local_in_brain"],
        flip: Mapping[str, Any] | None = None,
        affine: Mapping[str, Any] | None = None,
        intensity: Mapping[str, Any] | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise UserError(
                f"views: unknown key(s) {sorted(unknown)}; known keys: "
                f"{', '.join(DEFAULT_VIEWS_CONFIG)}"
            )
        if not isinstance(num_local_crops, int) or num_local_crops < 0:
            raise UserError(f"views.num_local_crops: expected an int >= 0, got {num_local_crops!r}")
        self.num_local_crops = num_local_crops
        self.global_size = _size(global_size, "global_size")
        self.local_size = _size(local_size, "local_size")
        scales = {
            "global_scale": _range(global_scale, "global_scale", 1e-6, 1.0),
            "local_scale": _range(local_scale, "local_scale", 1e-6, 1.0),
        }
        aspect = _range(aspect_ratio, "aspect_ratio", 1e-6, math.inf)
        if aspect[0] > 1.0 or aspect[1] < 1.0:
            raise UserError(f"views.aspect_ratio: {list(aspect)} must contain 1")
        flip = _merge(DEFAULT_VIEWS_CONFIG["flip"], flip, "flip")
        affine = _merge(DEFAULT_VIEWS_CONFIG["affine"], affine, "affine")
        intensity = _merge(DEFAULT_VIEWS_CONFIG["intensity"], intensity, "intensity")
        flip_prob = _prob(flip["prob"], "flip.prob")
        affine_prob = _prob(affine["prob"], "affine.prob")
        if any(a not in (0, 1, 2) for a in flip["axes"]):
            raise UserError(f"views.flip.axes: spatial axes are 0, 1, 2, got {flip['axes']!r}")
        probs = {
            name: _probs(aug["prob"], f"intensity.{name}.prob") for name, aug in intensity.items()
        }
        gamma = _range(intensity["gamma"]["range"], "intensity.gamma.range", 1e-6, math.inf)
        sigma = _range(intensity["smooth"]["sigma"], "intensity.smooth.sigma", 0.0, math.inf)
        # The parsed settings, for the batched device version (nidl_dino.views.device).
        self.global_scale, self.local_scale = scales["global_scale"], scales["local_scale"]
        self.aspect_ratio = aspect
        if not isinstance(local_in_brain, bool):
            raise UserError(f"views.local_in_brain: expected true or false, got {local_in_brain!r}")
        self.local_in_brain = local_in_brain
        self.flip = {"prob": flip_prob, "axes": tuple(int(a) for a in flip["axes"])}
        self.affine = {
            "prob": affine_prob,
            "rotate_deg": float(affine["rotate_deg"]),
            "scale": float(affine["scale"]),
        }
        self.intensity = intensity
        self.intensity_probs = probs
        self.gamma_range, self.sigma_range = gamma, sigma

        def view_pipeline(kind: int, size: tuple[int, int, int], scale: tuple) -> Compose:
            in_brain = kind == 2 and local_in_brain
            steps: list[Any] = [RandResizedCrop3d(size, scale, aspect, in_foreground=in_brain)]
            steps += [RandFlip(flip_prob, spatial_axis=a) for a in flip["axes"]]
            if affine_prob > 0:
                steps.append(
                    RandAffine(
                        affine_prob,
                        rotate_range=(math.radians(affine["rotate_deg"]),) * 3,
                        scale_range=(float(affine["scale"]),) * 3,
                        spatial_size=size,
                        padding_mode="border",
                        cache_grid=True,
                    )
                )
            bias = intensity["bias_field"]
            steps += [
                RandBiasField3d(probs["bias_field"][kind], bias["degree"], bias["coeff"]),
                RandAdjustContrast(probs["gamma"][kind], gamma=gamma),
                RandGaussianSmooth(sigma, sigma, sigma, prob=probs["smooth"][kind]),
                RandRelativeGaussianNoise(probs["noise"][kind], intensity["noise"]["std"]),
            ]
            return Compose(steps)

        self.global_views = [
            view_pipeline(0, self.global_size, scales["global_scale"]),
            view_pipeline(1, self.global_size, scales["global_scale"]),
        ]
        self.local_view = view_pipeline(2, self.local_size, scales["local_scale"])

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> MultiCropTransform:
        """Seed this transform and, from it, every view pipeline; returns ``self``."""
        super().set_random_state(seed, state)
        for pipeline in (*self.global_views, self.local_view):
            pipeline.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw here: each view pipeline draws its own parameters."""

    def __call__(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        img = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        with _without_metadata():
            views = [pipeline(img) for pipeline in self.global_views]
            views += [self.local_view(img) for _ in range(self.num_local_crops)]
        return [convert_to_tensor(v, dtype=torch.float32, track_meta=False) for v in views]

    def batch_views(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        """Views of a batch of volumes, made where the volumes are, volume by volume.

        MONAI's transforms read values back to the host (NumPy random state, ``float(tensor)``
        in the smoothing and contrast): for GPU batches use
        :class:`nidl_dino.views.device.DeviceViews`, which ``data.views_on_device`` uses.

        Args:
            volumes: ``(B, C, D, H, W)`` on any device.

        Returns:
            ``[g1, g2, l1, ..., lN]``, each ``(B, C, D', H', W')`` on the volumes' device.
        """
        per_volume = [self(v) for v in volumes]
        return [torch.stack(views) for views in zip(*per_volume, strict=True)]
