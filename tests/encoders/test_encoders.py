"""Encoder registry: (B, D) outputs, reported dims, specs, clear errors, one DINO fit step each."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from torch import nn

from nidl_dino.encoders.networks import (
    ENCODERS,
    IntensityBins,
    ViTEncoder,
    build_encoder,
    encoder_output_dim,
)
from nidl_dino.errors import UserError

from dino_fixtures import tiny_dino

torch.set_num_threads(1)

TINY_VIT = {"patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}
GLOBAL, LOCAL = 32, 16
needs_einops = pytest.mark.skipif(
    find_spec("einops") is None, reason="MONAI's ViT needs einops (pip install einops)"
)
# Registry encoders at tiny sizes; the heavy ones only under -m slow. DenseNet121 needs >= 29
# voxels per side, so it sees 32^3 views only.
CASES = [
    pytest.param("small_cnn", {"channels": [4, 8, 16, 32]}, [GLOBAL, LOCAL], 32, id="small_cnn"),
    pytest.param("vit", TINY_VIT, [GLOBAL, LOCAL], 32, id="vit", marks=needs_einops),
    pytest.param("resnet10", {}, [GLOBAL, LOCAL], 512, id="resnet10"),
    pytest.param("resnet18", {}, [GLOBAL, LOCAL], 512, id="resnet18", marks=pytest.mark.slow),
    pytest.param("resnet34", {}, [GLOBAL, LOCAL], 512, id="resnet34", marks=pytest.mark.slow),
    pytest.param("resnet50", {}, [GLOBAL, LOCAL], 2048, id="resnet50", marks=pytest.mark.slow),
    pytest.param("densenet121", {}, [GLOBAL, 32], 1024, id="densenet121", marks=pytest.mark.slow),
]


def test_registry_has_the_documented_names():
    assert set(ENCODERS) >= {
        "small_cnn",
        "resnet10",
        "resnet18",
        "resnet34",
        "resnet50",
        "densenet121",
        "vit",
    }


@pytest.mark.parametrize(("name", "kwargs", "sizes", "dim"), CASES)
def test_encoder_outputs_b_by_d_at_every_view_size(name, kwargs, sizes, dim):
    torch.manual_seed(0)
    spec = {"name": name, "kwargs": kwargs}
    encoder = build_encoder(spec, in_channels=1, image_size=[[s] * 3 for s in sizes])
    assert encoder.output_dim == dim == encoder_output_dim(spec, image_size=sizes[0])
    for size in sizes:
        out = encoder(torch.randn(2, 1, size, size, size))
        assert out.shape == (2, dim)
        assert torch.isfinite(out).all()


def test_spec_forms_name_mapping_import_path_and_module():
    assert build_encoder("small_cnn").output_dim == 128
    assert build_encoder({"name": "small_cnn", "kwargs": {"channels": [4, 8]}}).output_dim == 8
    # An import path without output_dim: the dimension is measured with a dry forward.
    kwargs = {"in_shape": [1, 16, 16, 16], "out_shape": [7], "channels": [4], "strides": [2]}
    for path in ("monai.networks.nets:Regressor", "monai.networks.nets.Regressor"):
        encoder = build_encoder({"name": path, "kwargs": kwargs}, image_size=16)
        assert encoder.output_dim == 7
        assert encoder_output_dim({"name": path, "kwargs": kwargs}, image_size=16) == 7
    module = build_encoder("small_cnn")
    assert build_encoder(module) is module


@needs_einops
def test_encoder_output_dim_builds_nothing_real():
    assert encoder_output_dim("resnet50") == 2048
    assert encoder_output_dim({"name": "vit", "kwargs": {"hidden_size": 96, "num_heads": 4}}) == 96


@needs_einops
def test_vit_matches_monai_forward_at_its_own_size():
    # At img_size no interpolation happens: our forward must equal MONAI's ViT forward.
    torch.manual_seed(0)
    encoder = build_encoder({"name": "vit", "kwargs": TINY_VIT}, image_size=GLOBAL).eval()
    x = torch.randn(2, 1, GLOBAL, GLOBAL, GLOBAL)
    with torch.no_grad():
        expected = encoder.vit(x)[0]
        torch.testing.assert_close(encoder(x), expected)


@needs_einops
def test_vit_mean_pool_and_anisotropic_sizes():
    encoder = ViTEncoder(img_size=GLOBAL, pool="mean", **TINY_VIT)
    assert encoder(torch.randn(2, 1, 16, 24, 32)).shape == (2, 32)


@pytest.mark.parametrize(
    ("spec", "image_size", "words"),
    [
        ("resnet9", None, ["resnet9", "small_cnn", "import path"]),
        (
            {"name": "vit", "kwargs": {"patch_size": 16}},
            [[96] * 3, [40] * 3],
            ["(40, 40, 40)", "16"],
        ),
        ({"name": "vit", "kwargs": {"img_size": 20, "patch_size": 8}}, None, ["(20, 20, 20)"]),
        ("densenet121", [[48] * 3, [24] * 3], ["densenet121", "(24, 24, 24)", "29"]),
        ({"name": "resnet18", "kwargs": {"depth": 3}}, None, ["resnet18", "depth"]),
        ({"name": "small_cnn", "kwargs": {"norm": "bogus"}}, None, ["small_cnn", "BOGUS"]),
        ({"nme": "small_cnn"}, None, ["nme"]),
        ({"kwargs": {}}, None, ["name"]),
        ("no_such_pkg.mod:Net", None, ["no_such_pkg.mod:Net"]),
        ({"name": "torch.nn:AdaptiveAvgPool3d", "kwargs": {"output_size": 2}}, None, ["(B, D)"]),
        ("small_cnn", [[32, 32], 16], ["[32, 32]"]),
    ],
)
def test_bad_specs_fail_early_with_one_clear_line(spec, image_size, words):
    with pytest.raises(UserError) as info:
        build_encoder(spec, image_size=image_size)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_image_size_forms():
    from nidl_dino.encoders.networks import parse_image_sizes

    assert parse_image_sizes(None) == []
    assert parse_image_sizes(32) == [(32, 32, 32)]
    assert parse_image_sizes([32, 24, 16]) == [(32, 24, 16)]
    assert parse_image_sizes([48, 24]) == [(48, 48, 48), (24, 24, 24)]
    assert parse_image_sizes([[48, 48, 40], 24]) == [(48, 48, 40), (24, 24, 24)]


@needs_einops
def test_vit_rejects_an_input_size_at_forward_time():
    encoder = ViTEncoder(img_size=GLOBAL, **TINY_VIT)
    with pytest.raises(UserError, match="patch_size"):
        encoder(torch.randn(1, 1, 20, 16, 16))


FIT_CASES = [
    pytest.param("small_cnn", {"channels": [4, 8, 16, 32]}, (GLOBAL, LOCAL), True, id="small_cnn"),
    pytest.param(
        "small_cnn",
        {"channels": [4, 8, 16, 32], "output": "stages_mean_std"},
        (GLOBAL, LOCAL),
        True,
        id="small_cnn_stages_mean_std",
    ),
    pytest.param("vit", TINY_VIT, (GLOBAL, LOCAL), False, id="vit", marks=needs_einops),
    pytest.param("resnet10", {}, (GLOBAL, LOCAL), True, id="resnet10", marks=pytest.mark.slow),
    pytest.param("resnet18", {}, (GLOBAL, LOCAL), True, id="resnet18", marks=pytest.mark.slow),
    pytest.param("resnet34", {}, (GLOBAL, LOCAL), True, id="resnet34", marks=pytest.mark.slow),
    pytest.param("resnet50", {}, (GLOBAL, LOCAL), True, id="resnet50", marks=pytest.mark.slow),
    pytest.param("densenet121", {}, (GLOBAL, 32), True, id="densenet121", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "kwargs", "sizes", "batch_norm"), FIT_CASES)
def test_one_dino_fit_step(name, kwargs, sizes, batch_norm):

    g, loc = sizes
    n_local = 2
    torch.manual_seed(0)
    batches = [
        [torch.randn(2, 1, g, g, g) for _ in range(2)]
        + [torch.randn(2, 1, loc, loc, loc) for _ in range(n_local)]
    ]
    encoder = build_encoder({"name": name, "kwargs": kwargs}, image_size=[[g] * 3, [loc] * 3])
    model = tiny_dino(encoder, n_local, proj_batch_norm=batch_norm, max_steps=1)
    before = [p.detach().clone() for p in model.student.parameters()]
    model.fit(torch.utils.data.DataLoader(batches, batch_size=None))
    after = list(model.student.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)
    features = model.transform(torch.utils.data.DataLoader(torch.randn(2, 1, g, g, g)))
    assert features.shape == (2, encoder.output_dim)


def test_import_path_module_is_an_nn_module():
    encoder = build_encoder("torch.nn:Flatten", image_size=4)
    assert isinstance(encoder, nn.Flatten)
    assert encoder.output_dim == 64


# Stage channels of each registry encoder, from the architectures' definitions: small_cnn's
# channels; MONAI ResNet layer1-4 = 64, 128, 256, 512 planes (x4 for resnet50's bottlenecks);
# DenseNet121 (growth 32, blocks 6/12/24/16, init 64): 256 -> 128, 512 -> 256, 1024 -> 512, 1024.
STAGE_CASES = [
    pytest.param("small_cnn", {"channels": [4, 8, 16, 32]}, [4, 8, 16, 32], 32, id="small_cnn"),
    pytest.param("resnet10", {}, [64, 128, 256, 512], 32, id="resnet10"),
    pytest.param("resnet50", {}, [256, 512, 1024, 2048], 32, id="resnet50", marks=pytest.mark.slow),
    pytest.param(
        "densenet121", {}, [128, 256, 512, 1024], 32, id="densenet121", marks=pytest.mark.slow
    ),
    pytest.param("vit", {**TINY_VIT, "num_layers": 6}, [32] * 4, 32, id="vit", marks=needs_einops),
    pytest.param("vit", TINY_VIT, [32], 32, id="vit-1-block", marks=needs_einops),
]


@pytest.mark.parametrize(("name", "kwargs", "channels", "size"), STAGE_CASES)
def test_stage_pooling_joins_every_stage_and_ends_with_the_encoder_output(
    name, kwargs, channels, size
):
    from nidl_dino.encoders.readout import feature_encoder, stage_outputs

    torch.manual_seed(0)
    encoder = build_encoder({"name": name, "kwargs": kwargs}, image_size=size).eval()
    pooled = feature_encoder(encoder, "stages").eval()
    assert pooled.output_dim == sum(channels)
    x = torch.randn(2, 1, size, size, size)
    with torch.no_grad():
        features, own = pooled(x), encoder(x)
        maps = stage_outputs(encoder, x)
    assert features.shape == (2, sum(channels))
    assert [m.shape[1] for m in maps] == channels
    # the last block is what DINO trained: the encoder's own output
    torch.testing.assert_close(features[:, -encoder.output_dim :], own)
    # each block is its stage's mean over space
    start = 0
    for m, c in zip(maps, channels, strict=True):
        expected = m.reshape(2, c, -1).mean(-1) if m.ndim == 5 else m
        torch.testing.assert_close(features[:, start : start + c], expected)
        start += c
    assert feature_encoder(encoder, "last") is encoder


def test_small_cnn_stages_are_its_stride_two_maps():
    from nidl_dino.encoders.readout import stage_outputs

    encoder = build_encoder({"name": "small_cnn", "kwargs": {"channels": [2, 3, 4]}}).eval()
    maps = stage_outputs(encoder, torch.randn(1, 1, 16, 16, 16))
    assert [tuple(m.shape) for m in maps] == [(1, 2, 8, 8, 8), (1, 3, 4, 4, 4), (1, 4, 2, 2, 2)]


def test_stage_pooling_of_an_unknown_module_says_what_to_do():
    from nidl_dino.encoders.readout import feature_encoder

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 3, 3)
            self.output_dim = 3

        def forward(self, x):
            return self.conv(x).mean((2, 3, 4))

    with pytest.raises(UserError, match="extract.pooling: last"):
        feature_encoder(Plain(), "stages")
    assert feature_encoder(Plain(), "last").output_dim == 3
    with pytest.raises(UserError, match="extract.pooling='mean'"):
        feature_encoder(Plain(), "mean")

    class WithStages(Plain):
        def stage_outputs(self, x):
            h = self.conv(x)
            return [h, h.amax((2, 3, 4))]

    x = torch.randn(2, 1, 8, 8, 8)
    pooled = feature_encoder(WithStages(), "stages")
    assert pooled.output_dim == 6
    with torch.no_grad():
        h = pooled.encoder.conv(x)
        torch.testing.assert_close(pooled(x), torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4))], 1))


def test_stages_mean_std_puts_each_maps_spatial_std_first():
    import numpy as np

    from nidl_dino.encoders.readout import feature_encoder, stage_outputs

    torch.manual_seed(0)
    channels = [2, 3, 4]
    encoder = build_encoder({"name": "small_cnn", "kwargs": {"channels": channels}}).eval()
    pooled = feature_encoder(encoder, "stages_mean_std").eval()
    assert pooled.output_dim == 2 * sum(channels)
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        features = pooled(x).numpy()
        maps = [m.numpy() for m in stage_outputs(encoder, x)]
    # population standard deviation over the voxels, sqrt(mean((v - mean(v))^2)), per channel
    std = np.concatenate(
        [np.sqrt(((m - m.mean((2, 3, 4), keepdims=True)) ** 2).mean((2, 3, 4))) for m in maps], 1
    )
    mean = np.concatenate([m.mean((2, 3, 4)) for m in maps], 1)
    np.testing.assert_allclose(features, np.concatenate([std, mean], 1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(features[:, -4:], encoder(x).numpy(), rtol=1e-6)


class InputStages(torch.nn.Module):
    """Stages that are the input itself and, with ``coarse``, its 2x block means."""

    def __init__(self, coarse: bool = True):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.coarse = coarse

    def stage_outputs(self, x):
        maps = [x * self.scale]
        return maps + [torch.nn.functional.avg_pool3d(x, 2)] if self.coarse else maps


def test_stages_quantiles_are_order_statistics_over_the_brain_only():
    from nidl_dino.encoders.readout import STAGE_QUANTILES, StagePooling, feature_encoder

    # A brain of n = 4^3 = 64 voxels holding 1..64 in a random order, zeros around it.
    n = 64
    x = torch.zeros(2, 1, 8, 8, 8)
    x[:, 0, 2:6, 2:6, 2:6] = (torch.randperm(n) + 1).float().reshape(4, 4, 4)
    x[1] *= 2.0
    quantiles = (0.0, 0.1, 0.5, 0.9, 1.0)
    pooled = StagePooling(InputStages(), std=True, quantiles=quantiles)
    with torch.no_grad():
        features = pooled(x)
    # rank floor(q (n - 1)) of the sorted brain values 1..n is the value floor(q (n - 1)) + 1;
    # the zeros outside are not counted
    expected = torch.tensor([float(int(q * (n - 1)) + 1) for q in quantiles])
    torch.testing.assert_close(features[0, : len(quantiles)], expected)
    torch.testing.assert_close(features[1, : len(quantiles)], 2 * expected)
    # the coarse map's brain is the 2^3 blocks of 2:6 (each block mean of 8 brain voxels)
    coarse = torch.nn.functional.avg_pool3d(x, 2)[0, 0, 1:3, 1:3, 1:3].flatten().sort().values
    torch.testing.assert_close(
        features[0, len(quantiles) : 2 * len(quantiles)],
        coarse[[int(q * 7) for q in quantiles]],
    )
    # then the standard deviations and means of both maps, as stages_mean_std
    assert features.shape[1] == 2 * len(quantiles) + 2 + 2
    torch.testing.assert_close(features[:, -2], x.mean((1, 2, 3, 4)))
    # the registry's readout uses the documented quantiles
    encoder = build_encoder({"name": "small_cnn", "kwargs": {"channels": [2, 3]}}).eval()
    # 5 quantiles, a std and a mean per channel of the 2 + 3 channels
    assert feature_encoder(encoder, "stages_quantiles").output_dim == (5 + 2) * (2 + 3)
    assert len(STAGE_QUANTILES) == 5
    with pytest.raises(ValueError, match="quantiles"):
        StagePooling(InputStages(), quantiles=(1.5,))


def test_stages_quantiles_of_a_large_map_rank_a_regular_subgrid():
    import numpy as np

    from nidl_dino.encoders.readout import QUANTILE_VOXELS, StagePooling

    # 40^3 = 64,000 voxels > 32^3: every 2nd voxel along each axis, ceil((64000 / 32^3)^(1/3))
    assert QUANTILE_VOXELS == 32**3
    rng = np.random.default_rng(0)
    volume = np.zeros((40, 40, 40), np.float32)
    volume[4:36, 6:34, 8:32] = rng.gamma(2.0, 1.0, size=(32, 28, 24)) + 0.01
    quantiles = (0.1, 0.5, 0.9)
    with torch.no_grad():
        got = StagePooling(InputStages(coarse=False), quantiles=quantiles)(
            torch.from_numpy(volume)[None, None]
        )
    sub = volume[::2, ::2, ::2]
    brain = np.sort(sub[sub != 0])
    expected = [brain[int(q * (len(brain) - 1))] for q in quantiles]
    np.testing.assert_allclose(got[0, :3].numpy(), expected, rtol=1e-6)
    # and each value's rank in the whole brain is within 2 % of its quantile
    whole = volume[volume != 0]
    ranks = [(whole <= value).mean() for value in got[0, :3].numpy()]
    np.testing.assert_allclose(ranks, quantiles, atol=0.02)


@needs_einops
def test_stages_mean_std_of_a_vit_keeps_its_token_vectors_once():
    from nidl_dino.encoders.readout import feature_encoder

    encoder = build_encoder({"name": "vit", "kwargs": {**TINY_VIT, "num_layers": 2}}, image_size=16)
    assert feature_encoder(encoder, "stages_mean_std").output_dim == 2 * 32


def test_default_pooling_is_config_yamls():
    from pathlib import Path

    import yaml

    from nidl_dino.encoders.readout import DEFAULT_POOLING, POOLINGS

    config = yaml.safe_load((Path(__file__).parents[2] / "config.yaml").read_text())
    assert config["extract"]["pooling"] == DEFAULT_POOLING and DEFAULT_POOLING in POOLINGS


def test_intensity_bins_are_gaussian_memberships_of_evenly_spaced_centres():
    # 5 centres over [0, 1]: 0, 0.25, ..., 1, spacing 0.25, width s = 0.125
    layer = IntensityBins(5)
    x = torch.tensor([0.0, 0.3, 0.8, 1.2]).view(1, 1, 4, 1, 1)
    out = layer(x)
    assert out.shape == (1, 6, 4, 1, 1)
    assert torch.equal(out[:, 0], x[:, 0])  # the intensity itself comes first
    for k, c in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        for i, v in enumerate([0.0, 0.3, 0.8, 1.2]):
            expected = torch.exp(torch.tensor(-((v - c) ** 2) / (2 * 0.125**2)))
            torch.testing.assert_close(out[0, 1 + k, i, 0, 0], expected)
    # two input channels: each channel then its own memberships
    two = IntensityBins(3)(torch.stack([x[:, 0], 1 - x[:, 0]], dim=1))
    assert two.shape == (1, 8, 4, 1, 1)
    torch.testing.assert_close(two[:, 4], 1 - x[:, 0])
    torch.testing.assert_close(two[:, 1:4], IntensityBins(3)(x)[:, 1:])


def test_small_cnn_with_intensity_bins_sees_the_binned_input():
    plain = build_encoder({"name": "small_cnn"})
    binned = build_encoder({"name": "small_cnn", "kwargs": {"intensity_bins": 8}})
    assert binned.features[0].conv.unit0.conv.in_channels == 9
    assert plain.features[0].conv.unit0.conv.in_channels == 1
    x = torch.rand(2, 1, 24, 24, 24)
    maps = binned.stage_outputs(x)
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    torch.testing.assert_close(binned(x), maps[-1].mean(dim=(2, 3, 4)))
    # the readout's probe pass feeds the encoder's own input channels, not its first conv's
    from nidl_dino.encoders.readout import feature_encoder

    for pooling in ("stages_mean_std", "stages_quantiles"):
        readout = feature_encoder(binned.eval(), pooling)
        assert readout(x).shape == (2, readout.output_dim)
    with pytest.raises(UserError, match="intensity_bins"):
        build_encoder({"name": "small_cnn", "kwargs": {"intensity_bins": 1}})


def test_small_cnn_stages_output_is_every_stage_std_then_mean():
    # output="stages_mean_std": per channel of each stage map, the population standard deviation
    # sqrt(mean(x^2) - mean(x)^2) over its voxels for every stage, then the means; the weights are
    # those of output="last" at the same seed (the random-weights baseline does not change).
    torch.manual_seed(3)
    last = build_encoder({"name": "small_cnn", "kwargs": {"channels": [4, 8, 16, 32]}})
    torch.manual_seed(3)
    spec = {
        "name": "small_cnn",
        "kwargs": {"channels": [4, 8, 16, 32], "output": "stages_mean_std"},
    }
    joined = build_encoder(spec)
    for a, b in zip(last.state_dict().values(), joined.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert joined.output_dim == 2 * (4 + 8 + 16 + 32)
    joined.eval()
    x = torch.rand(3, 1, 24, 24, 24, dtype=torch.float64)
    joined.double()
    out = joined(x)
    maps = [m.flatten(2) for m in joined.stage_outputs(x)]
    means = [m.sum(dim=2) / m.shape[2] for m in maps]
    stds = [
        ((m**2).sum(dim=2) / m.shape[2] - mu**2).clamp_min(0).sqrt()
        for m, mu in zip(maps, means, strict=True)
    ]
    torch.testing.assert_close(out, torch.cat(stds + means, dim=1))
    # the last features are the last stage's mean: output="last"'s vector
    torch.testing.assert_close(out[:, -32:], last.double().eval()(x))
    # the same vector as the readout of extract.pooling: stages_mean_std
    from nidl_dino.encoders.readout import feature_encoder

    torch.testing.assert_close(feature_encoder(joined, "stages_mean_std")(x), out)
    with pytest.raises(UserError, match="output"):
        build_encoder({"name": "small_cnn", "kwargs": {"output": "stages"}})
