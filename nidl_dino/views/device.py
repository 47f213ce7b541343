"""DINO's multi-crop views of a whole batch, made on the accelerator in batched torch operations.

:class:`DeviceViews` is the ``data.views_on_device`` path: the same recipe as
:class:`~nidl_dino.views.crops.MultiCropTransform` (random-resized crop, flips, optional affine, bias
field, gamma, Gaussian smoothing, relative noise, with per-view probabilities), written for a
batch ``(B, C, D, H, W)`` already on the device, so that a GPU run is not bound by CPU workers:

- every random number is drawn on the device from one ``torch.Generator`` seeded by the caller
  (the datamodule seeds it from the seed, the epoch, the rank and the batch's sample indices):
  ranks draw different views and a resumed run draws what the uninterrupted one drew;
- no host round trip: no ``.item()``, ``.cpu()`` or ``float(tensor)``, no NumPy, no
  data-dependent shapes; probabilities are applied with ``torch.where`` on fixed-shape tensors
  (a transform that is not drawn still runs, and is discarded: cheaper on a GPU than a sync);
- crop, resize, flips and the affine are one ``grid_sample`` per view (trilinear,
  ``align_corners=False``: a crop resized to its own size samples its voxel centres, to float
  rounding); local crops centred in the brain (``views.local_in_brain``) draw their centre with one
  ``torch.multinomial`` over the foreground;
  the Gaussian kernels are built on the device, three separable grouped convolutions per view;
  the Legendre bases of the bias field are built once per view size.

The CPU-worker path (MONAI transforms, NumPy random state) and this one draw from the same
distributions but not the same numbers, and differ in details stated here: crops whose stretched
sides exceed the volume are clipped (not redrawn 10 times), smoothing kernels are sampled
Gaussians truncated at 4 sigma of the largest sigma.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from nidl_dino.views.crops import MultiCropTransform

__all__ = ["DeviceViews"]

_GAMMA_EPS = 1e-7  # MONAI's AdjustContrast epsilon


class DeviceViews:
    """Batched, on-device version of a :class:`~nidl_dino.views.crops.MultiCropTransform`.

    Args:
        spec: the view configuration (sizes, scales, probabilities), e.g. built from the
            ``views:`` section of config.yaml.

    Input:
        ``volumes`` ``(B, C, D, H, W)`` on any device, and an int ``seed``.

    Returns:
        ``[g1, g2, l1, ..., lN]``: float32 (float64 for float64 volumes) tensors
        ``(B, C, *global_size)`` then ``(B, C, *local_size)``, on the volumes' device.

    Example:
        >>> views = DeviceViews(MultiCropTransform(**DEFAULT_VIEWS_CONFIG))
        >>> [tuple(v.shape) for v in views(torch.rand(4, 1, 64, 64, 64), seed=0)][:3]
        [(4, 1, 48, 48, 48), (4, 1, 48, 48, 48), (4, 1, 24, 24, 24)]
    """

    def __init__(self, spec: MultiCropTransform) -> None:
        self.spec = spec
        self.num_local_crops = spec.num_local_crops
        self._legendre: dict[Any, tuple[torch.Tensor, ...]] = {}
        self._bias_mask: dict[Any, torch.Tensor] = {}
        #: Per view, the crop boxes of the last call: {"start": (B, 3), "sides": (B, 3)} in
        #: voxels (device tensors; for tests and debugging).
        self.last_boxes: list[dict[str, torch.Tensor]] = []
        self._crop_weights: torch.Tensor | None = None  # local crops' weights, per call

    def __call__(self, volumes: torch.Tensor, seed: int) -> list[torch.Tensor]:
        if volumes.ndim != 5:
            raise ValueError(f"DeviceViews expects volumes (B, C, D, H, W), got {volumes.shape}")
        gen = torch.Generator(device=volumes.device).manual_seed(int(seed))
        # float32 (float64 stays: precision 64-true converts batches before the transfer)
        volumes = volumes if volumes.dtype == torch.float64 else volumes.float()
        self.last_boxes = []
        kinds = [0, 1] + [2] * self.num_local_crops
        # the local crops' sampling weights, once per batch (not once per local view)
        self._crop_weights = None
        if self.spec.local_in_brain and self.num_local_crops > 0:
            self._crop_weights = self._foreground_weights(volumes)
        return [self._view(volumes, kind, gen) for kind in kinds]

    # ------------------------------------------------------------------ random draws
    @staticmethod
    def _uniform(gen, shape, low: float, high: float, device) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen, device=device)

    @staticmethod
    def _chance(gen, batch: int, prob: float, device) -> torch.Tensor:
        return torch.rand(batch, generator=gen, device=device) < prob

    # ------------------------------------------------------------------ one view
    def _view(self, volumes: torch.Tensor, kind: int, gen: torch.Generator) -> torch.Tensor:
        spec = self.spec
        size = spec.global_size if kind < 2 else spec.local_size
        theta = self._theta(volumes, kind, gen)
        grid = F.affine_grid(
            theta.to(volumes.dtype), [volumes.shape[0], volumes.shape[1], *size], False
        )
        out = F.grid_sample(
            volumes, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        probs = spec.intensity_probs
        if probs["bias_field"][kind] > 0:
            out = self._bias_field(out, probs["bias_field"][kind], gen)
        if probs["gamma"][kind] > 0:
            out = self._gamma(out, probs["gamma"][kind], gen)
        if probs["smooth"][kind] > 0:
            out = self._smooth(out, probs["smooth"][kind], gen)
        if probs["noise"][kind] > 0:
            out = self._noise(out, probs["noise"][kind], gen)
        return out

    def _theta(self, volumes: torch.Tensor, kind: int, gen: torch.Generator) -> torch.Tensor:
        """(B, 3, 4) affine of ``affine_grid``: output view coordinates -> input coordinates."""
        spec, device = self.spec, volumes.device
        batch = volumes.shape[0]
        shape = torch.tensor(volumes.shape[2:], dtype=torch.float32, device=device)  # (D, H, W)
        low, high = spec.global_scale if kind < 2 else spec.local_scale
        scale = self._uniform(gen, (batch, 1), low, high, device)
        log_a = [math.log(a) for a in spec.aspect_ratio]
        log_stretch = self._uniform(gen, (batch, 3), log_a[0], log_a[1], device)
        stretch = torch.exp(log_stretch - log_stretch.mean(dim=1, keepdim=True))
        sides = torch.round(shape * scale ** (1 / 3) * stretch)
        sides = torch.minimum(sides.clamp_min(1.0), shape)
        if kind == 2 and spec.local_in_brain:
            start = self._start_in_foreground(self._crop_weights, volumes.shape, sides, gen)
        else:
            start = torch.floor(
                torch.rand((batch, 3), generator=gen, device=device) * (shape - sides + 1)
            )
        start = torch.minimum(start, shape - sides)
        self.last_boxes.append({"start": start, "sides": sides})
        centre = (2 * start + sides) / shape - 1  # normalised, align_corners=False
        # linear part in (D, H, W) order: diag(1/N) A diag(sides) diag(flips)
        signs = torch.ones(batch, 3, device=device)
        for axis in spec.flip["axes"]:
            flipped = self._chance(gen, batch, spec.flip["prob"], device)
            signs[:, axis] = torch.where(flipped, -1.0, 1.0)
        linear = torch.diag_embed(sides * signs)
        if spec.affine["prob"] > 0:
            linear = self._affine(gen, batch, device) @ linear
        linear = linear / shape[:, None]
        # affine_grid's coordinates are (x, y, z) = (W, H, D): reverse both axes
        linear = linear.flip(-1).flip(-2)
        return torch.cat([linear, centre.flip(-1)[:, :, None]], dim=2)

    @staticmethod
    def _foreground_weights(volumes: torch.Tensor) -> torch.Tensor:
        """(B, D*H*W) sampling weights: 1 on non-zero voxels (any channel), 0 elsewhere; a
        volume without non-zero voxels weighs every voxel alike."""
        foreground = volumes.ne(0).any(dim=1).flatten(1).float()
        empty = foreground.sum(dim=1, keepdim=True) == 0
        return torch.where(empty, torch.ones_like(foreground), foreground)

    @staticmethod
    def _start_in_foreground(
        weights: torch.Tensor, shape: torch.Size, sides: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """(B, 3) crop starts centred on a voxel drawn with ``weights`` (:meth:`_foreground_weights`).

        One ``torch.multinomial`` (no host sync). The start is shifted inside the volume where
        the crop would cross its edge (the caller clamps the far side).
        """
        flat = torch.multinomial(weights, 1, generator=gen).squeeze(1)
        h, w = shape[-2:]
        centre = torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1).to(sides.dtype)
        return (centre - torch.floor(sides / 2)).clamp_min(0.0)

    def _affine(self, gen: torch.Generator, batch: int, device) -> torch.Tensor:
        """(B, 3, 3) rotation x scaling about the crop centre (identity where not drawn)."""
        affine = self.spec.affine
        max_angle = math.radians(affine["rotate_deg"])
        angles = self._uniform(gen, (batch, 3), -max_angle, max_angle, device)
        zoom = 1.0 + self._uniform(gen, (batch, 3), -affine["scale"], affine["scale"], device)
        cos, sin = torch.cos(angles), torch.sin(angles)
        one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

        def rot(c, s, axes):
            m = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
            i, j = axes
            m[i][i], m[i][j], m[j][i], m[j][j] = c, -s, s, c
            return torch.stack([torch.stack(row, dim=-1) for row in m], dim=-2)

        rotation = (
            rot(cos[:, 0], sin[:, 0], (1, 2))
            @ rot(cos[:, 1], sin[:, 1], (0, 2))
            @ rot(cos[:, 2], sin[:, 2], (0, 1))
        )
        matrix = rotation @ torch.diag_embed(zoom)
        drawn = self._chance(gen, batch, affine["prob"], device)
        eye = torch.eye(3, device=device).expand(batch, 3, 3)
        return torch.where(drawn[:, None, None], matrix, eye)

    # ------------------------------------------------------------------ intensity changes
    def _bases(self, size, device) -> tuple[torch.Tensor, ...]:
        key = (tuple(size), str(device))
        if key not in self._legendre:
            degree = int(self.spec.intensity["bias_field"]["degree"])
            bases = []
            for n in size:
                x = torch.linspace(-1.0, 1.0, n, device=device)
                polys = [torch.ones_like(x), x]
                for d in range(1, degree):  # Bonnet's recursion
                    polys.append(((2 * d + 1) * x * polys[d] - d * polys[d - 1]) / (d + 1))
                bases.append(torch.stack(polys[: degree + 1]))
            n = degree + 1
            i, j, k = torch.meshgrid(*(torch.arange(n, device=device),) * 3, indexing="ij")
            self._bias_mask[key] = ((i + j + k) <= degree).float()
            self._legendre[key] = tuple(bases)
        return self._legendre[key], self._bias_mask[key]

    def _bias_field(self, img: torch.Tensor, prob: float, gen) -> torch.Tensor:
        (pz, py, px), mask = self._bases(img.shape[2:], img.device)
        batch, coeff = img.shape[0], float(self.spec.intensity["bias_field"]["coeff"])
        coeffs = self._uniform(gen, (batch, *mask.shape), -coeff, coeff, img.device) * mask
        drawn = self._chance(gen, batch, prob, img.device)
        coeffs = coeffs * drawn[:, None, None, None]  # zero field where not drawn: exp(0) = 1
        field = torch.einsum("bijk,id,jh,kw->bdhw", coeffs, pz, py, px)
        return img * torch.exp(field)[:, None]

    def _gamma(self, img: torch.Tensor, prob: float, gen) -> torch.Tensor:
        batch = img.shape[0]
        gamma = self._uniform(gen, (batch, 1, 1, 1, 1), *self.spec.gamma_range, img.device)
        low = img.amin(dim=(1, 2, 3, 4), keepdim=True)
        span = img.amax(dim=(1, 2, 3, 4), keepdim=True) - low
        changed = ((img - low) / (span + _GAMMA_EPS)).clamp_min(0) ** gamma * span + low
        drawn = self._chance(gen, batch, prob, img.device)
        return torch.where(drawn[:, None, None, None, None], changed, img)

    def _smooth(self, img: torch.Tensor, prob: float, gen) -> torch.Tensor:
        batch, channels = img.shape[:2]
        low, high = self.spec.sigma_range
        radius = max(1, int(4.0 * high + 0.5))
        sigma = self._uniform(gen, (batch, 3), low, high, img.device).clamp_min(1e-3)
        offsets = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
        kernels = torch.exp(-(offsets**2) / (2 * sigma[..., None] ** 2))  # (B, 3, K)
        kernels = kernels / kernels.sum(dim=-1, keepdim=True)
        out = img.reshape(1, batch * channels, *img.shape[2:])
        for axis in range(3):
            shape = [batch * channels, 1, 1, 1, 1]
            shape[2 + axis] = 2 * radius + 1
            weight = kernels[:, axis].repeat_interleave(channels, dim=0).reshape(shape)
            padding = [0, 0, 0]
            padding[axis] = radius
            out = F.conv3d(out, weight, padding=padding, groups=batch * channels)
        out = out.reshape(img.shape)
        drawn = self._chance(gen, batch, prob, img.device)
        return torch.where(drawn[:, None, None, None, None], out, img)

    def _noise(self, img: torch.Tensor, prob: float, gen) -> torch.Tensor:
        batch = img.shape[0]
        fraction = self._uniform(
            gen, (batch,), 0.0, float(self.spec.intensity["noise"]["std"]), img.device
        )
        drawn = self._chance(gen, batch, prob, img.device)
        std = img.std(dim=(1, 2, 3, 4)) * fraction * drawn
        noise = torch.randn(img.shape, generator=gen, device=img.device, dtype=img.dtype)
        return img + noise * std[:, None, None, None, None]
