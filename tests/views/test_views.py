"""3D multi-crop views: count and order, shapes, randomness, crops inside the volume, numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nidl_dino.errors import UserError
from nidl_dino.views.crops import (
    DEFAULT_VIEWS_CONFIG,
    MultiCropTransform,
    RandBiasField3d,
    RandRelativeGaussianNoise,
    RandResizedCrop3d,
)

torch.set_num_threads(1)

SMALL = {"global_size": [16, 16, 12], "local_size": 8, "num_local_crops": 3}


def volume(size=(24, 24, 20), seed=0) -> torch.Tensor:
    return torch.rand((1, *size), generator=torch.Generator().manual_seed(seed))


def test_views_count_order_shape_dtype_finite():
    views = MultiCropTransform(**SMALL).set_random_state(0)(volume())
    assert len(views) == 2 + 3
    assert [tuple(v.shape) for v in views] == [(1, 16, 16, 12)] * 2 + [(1, 8, 8, 8)] * 3
    for v in views:
        assert type(v) is torch.Tensor  # plain tensors, not MONAI MetaTensors
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()


def test_defaults_give_the_documented_views_and_accept_numpy():
    transform = MultiCropTransform(**DEFAULT_VIEWS_CONFIG).set_random_state(0)
    views = transform(np.random.default_rng(0).random((1, 40, 40, 40), dtype=np.float32))
    n_local = DEFAULT_VIEWS_CONFIG["num_local_crops"]
    g, loc = DEFAULT_VIEWS_CONFIG["global_size"], DEFAULT_VIEWS_CONFIG["local_size"]
    assert [list(v.shape[1:]) for v in views] == [g, g] + [loc] * n_local


def test_no_local_crops():
    views = MultiCropTransform(**{**SMALL, "num_local_crops": 0}).set_random_state(0)(volume())
    assert len(views) == 2


def test_views_differ_between_calls_and_repeat_under_the_same_seed():
    x = volume()
    a = MultiCropTransform(**SMALL).set_random_state(1)
    b = MultiCropTransform(**SMALL).set_random_state(1)
    first, second = a(x), a(x)
    assert not torch.equal(first[0], first[1])  # the two global views differ
    assert all(not torch.equal(u, v) for u, v in zip(first, second, strict=True))
    for u, v in zip(first + second, b(x) + b(x), strict=True):
        assert torch.equal(u, v)
    other = MultiCropTransform(**SMALL).set_random_state(2)(x)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    ("scale", "aspect"),
    [((0.4, 1.0), (0.8, 1.25)), ((0.01, 1.0), (0.3, 3.0)), ((1.0, 1.0), (1, 1))],
)
def test_crops_stay_inside_the_volume(scale, aspect):
    crop = RandResizedCrop3d(8, scale, aspect).set_random_state(0)
    shape = (30, 21, 17)
    for _ in range(300):
        crop.randomize(shape)
        start, stop = crop.box
        for a, b, n in zip(start, stop, shape, strict=True):
            assert 0 <= a < b <= n


def test_crop_takes_the_box_it_reports_and_its_volume_fraction():
    # Side 16 of 32 (scale 1/8, no aspect jitter) needs no resizing: the output is the box itself.
    x = torch.arange(32**3, dtype=torch.float32).reshape(1, 32, 32, 32)
    crop = RandResizedCrop3d(16, (0.125, 0.125), (1.0, 1.0)).set_random_state(0)
    for _ in range(5):
        out = crop(x)
        (z0, y0, x0), (z1, y1, x1) = crop.box
        assert (z1 - z0, y1 - y0, x1 - x0) == (16, 16, 16)
        assert torch.equal(out, x[:, z0:z1, y0:y1, x0:x1])
    crop = RandResizedCrop3d(8, (0.2, 0.5), (1.0, 1.0)).set_random_state(0)
    for _ in range(50):
        crop.randomize((40, 40, 40))
        sides = np.subtract(crop.box[1], crop.box[0])
        assert 0.2 * 0.9 <= np.prod(sides) / 40**3 <= 0.5 * 1.1  # rounding of the sides


def test_global_and_local_crops_cover_their_scale_ranges():
    transform = MultiCropTransform(
        **{**SMALL, "global_scale": [0.5, 1.0], "local_scale": [0.05, 0.2]}
    )
    transform.set_random_state(0)
    global_crop, local_crop = (
        transform.global_views[0].transforms[0],
        transform.local_view.transforms[0],
    )
    shape = (40, 40, 40)
    for crop, (low, high) in ((global_crop, (0.5, 1.0)), (local_crop, (0.05, 0.2))):
        fractions = []
        for _ in range(200):
            crop.randomize(shape)
            fractions.append(np.prod(np.subtract(crop.box[1], crop.box[0])) / np.prod(shape))
        assert low * 0.8 <= min(fractions) and max(fractions) <= high * 1.1


def test_bias_field_matches_numpy_legendre_grid():
    t = RandBiasField3d(prob=1.0, degree=3, coeff=0.3).set_random_state(0)
    x = torch.rand(1, 7, 9, 11, dtype=torch.float64) + 0.5
    out = t(x)
    coords = [np.linspace(-1.0, 1.0, n) for n in x.shape[1:]]
    field = np.polynomial.legendre.leggrid3d(*coords, t._coeffs)
    np.testing.assert_allclose(out.numpy(), x.numpy() * np.exp(field)[None], rtol=1e-10)
    # only terms of total degree <= 3 are drawn
    i, j, k = np.nonzero(t._coeffs)
    assert (i + j + k).max() <= 3


def test_noise_std_is_relative_to_the_image():
    x = 100.0 * torch.randn(1, 32, 32, 32)
    t = RandRelativeGaussianNoise(prob=1.0, std=0.1).set_random_state(0)
    for _ in range(5):
        out = t(x)
        added = (out - x).std() / x.std()
        assert 0 < added <= 0.1 * 1.05
        assert added == pytest.approx(t._fraction, rel=0.05)
    assert torch.equal(RandRelativeGaussianNoise(prob=0.0)(x), x)


def test_probabilities_are_per_view():
    # Smoothing always on global view 1, never on global view 2 nor on local views.
    intensity = {
        "smooth": {"prob": [1.0, 0.0, 0.0], "sigma": [2.0, 2.0]},
        "gamma": {"prob": [0, 0, 0]},
        "bias_field": {"prob": [0, 0, 0]},
        "noise": {"prob": [0, 0, 0]},
    }
    cfg = {**SMALL, "flip": {"prob": 0.0}, "intensity": intensity}
    x = torch.rand(1, 16, 16, 12)
    cfg_scale = {
        **cfg,
        "global_scale": [1.0, 1.0],
        "local_scale": [1.0, 1.0],
        "aspect_ratio": [1, 1],
    }
    views = MultiCropTransform(**cfg_scale).set_random_state(0)(x)
    assert not torch.allclose(views[0], x)  # smoothed
    assert torch.allclose(views[1], x)  # full-volume crop at the same size, nothing else
    assert views[0].std() < x.std()


def test_affine_views_keep_their_size():
    cfg = {**SMALL, "affine": {"prob": 1.0, "rotate_deg": 10, "scale": 0.1}}
    views = MultiCropTransform(**cfg).set_random_state(0)(volume())
    assert [tuple(v.shape) for v in views] == [(1, 16, 16, 12)] * 2 + [(1, 8, 8, 8)] * 3


def test_batch_views_makes_the_same_batch_format():
    transform = MultiCropTransform(**SMALL).set_random_state(0)
    volumes = torch.stack([volume(seed=s) for s in range(4)])
    views = transform.batch_views(volumes)
    assert [tuple(v.shape) for v in views] == [(4, 1, 16, 16, 12)] * 2 + [(4, 1, 8, 8, 8)] * 3
    again = MultiCropTransform(**SMALL).set_random_state(0).batch_views(volumes)
    assert all(torch.equal(u, v) for u, v in zip(views, again, strict=True))


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"global_sise": 32}, "global_sise"),
        ({"num_local_crops": -1}, "views.num_local_crops"),
        ({"local_scale": [0.5, 0.1]}, "views.local_scale"),
        ({"global_scale": [0.0, 1.0]}, "views.global_scale"),
        ({"local_size": [8, 8]}, "views.local_size"),
        ({"aspect_ratio": [1.1, 1.5]}, "views.aspect_ratio"),
        ({"flip": {"prob": 2}}, "views.flip.prob"),
        ({"flip": {"axes": [3]}}, "views.flip.axes"),
        ({"intensity": {"noise": {"prob": [0.1, 0.2]}}}, "views.intensity.noise.prob"),
        ({"intensity": {"blur": {}}}, "views.intensity"),
        ({"intensity": {"gamma": {"range": [2, 1]}}}, "views.intensity.gamma.range"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        MultiCropTransform(**cfg)


def _box_volume(shape=(40, 36, 32), box=((20, 30), (6, 14), (10, 22))) -> torch.Tensor:
    x = torch.zeros((1, *shape))
    (z0, z1), (y0, y1), (x0, x1) = box
    x[0, z0:z1, y0:y1, x0:x1] = 1.0
    return x


def test_a_crop_in_the_foreground_is_centred_on_a_non_zero_voxel():
    # The box lies 4+ voxels from every edge and crops have side 8: no shift at the edges, so
    # the crop's centre voxel (start + side // 2) is the drawn one, inside the box.
    x = _box_volume()
    crop = RandResizedCrop3d(8, (8**3 / x[0].numel(),) * 2, (1, 1), in_foreground=True)
    crop.set_random_state(0)
    centres = []
    for _ in range(300):
        out = crop(x)
        start, stop = crop.box
        centre = [a + (b - a) // 2 for a, b in zip(start, stop, strict=True)]
        assert x[0, centre[0], centre[1], centre[2]] == 1.0
        assert out.shape == (1, 8, 8, 8) and out.sum() > 0
        centres.append(centre)
    # drawn uniformly over the box: the mean centre is the box's middle (voxel indices 19.5 +
    # 4 .. 10 / 15.5 means, standard error < 0.2 voxel over 300 draws)
    assert np.allclose(np.mean(centres, axis=0), [24.5, 9.5, 15.5], atol=0.7)


def test_crops_anywhere_miss_a_small_foreground_and_an_empty_volume_falls_back():
    x = _box_volume()
    anywhere = RandResizedCrop3d(8, (8**3 / x[0].numel(),) * 2, (1, 1)).set_random_state(0)
    assert any(anywhere(x).sum() == 0 for _ in range(100))
    crop = RandResizedCrop3d(8, (0.05, 0.2), (1, 1), in_foreground=True).set_random_state(0)
    for _ in range(20):
        out = crop(torch.zeros(1, 20, 20, 20))  # nothing non-zero: a uniform position
        start, stop = crop.box
        assert out.shape == (1, 8, 8, 8)
        assert all(0 <= a < b <= 20 for a, b in zip(start, stop, strict=True))


def test_local_in_brain_moves_the_local_views_only():
    x = _box_volume()
    cfg = {**SMALL, "global_scale": [0.3, 0.3], "local_scale": [0.01, 0.01], "num_local_crops": 8}
    cfg["intensity"] = {"noise": {"prob": [0, 0, 0]}, "smooth": {"prob": [0, 0, 0]}}
    views = MultiCropTransform(**cfg, local_in_brain=True).set_random_state(0)
    assert not views.global_views[0].transforms[0].in_foreground
    assert views.local_view.transforms[0].in_foreground
    for _ in range(10):
        assert all(v.sum() > 0 for v in views(x)[2:])
    with pytest.raises(UserError, match=r"views\.local_in_brain"):
        MultiCropTransform(local_in_brain="yes")
