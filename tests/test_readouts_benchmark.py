"""benchmarks/readouts.py reads the same numbers out of an encoder as the workflow's readout."""

from __future__ import annotations

import numpy as np
import torch
from benchmark_scripts import load_benchmark

from nidl_dino.encoders.networks import build_encoder
from nidl_dino.encoders.readout import StagePooling


def test_mean_std_is_the_workflows_readout_and_subsets_partition_it():
    readouts = load_benchmark("readouts")
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", in_channels=1, image_size=None).eval()
    x = torch.rand(3, 1, 24, 24, 24)
    x[:, :, :4] = 0.0  # a zero margin, as outside the brain mask
    out = readouts.readouts(readouts.stage_maps(encoder, x, batch=2), x)
    with torch.no_grad():
        workflow = StagePooling(encoder, std=True)(x).numpy()
    # the same values, in another column order (per stage instead of all stds then all means)
    assert out["mean_std"].shape == workflow.shape
    assert np.allclose(np.sort(out["mean_std"], axis=1), np.sort(workflow, axis=1), atol=1e-5)
    stages = [out[f"stage{k}"] for k in (1, 2, 3, 4)]
    assert np.allclose(np.concatenate(stages, axis=1), out["mean_std"])
    assert np.allclose(np.concatenate(stages[:2], axis=1), out["stages12"])
    # 5 quantiles per channel, ordered within each channel
    q = out["brainq"].reshape(3, -1, 5)
    assert q.shape[1] == 16 + 32 + 64 + 128 and (np.diff(q, axis=2) >= -1e-6).all()


def test_mean_std_at_size_reads_the_volume_as_the_global_views_show_it():
    readouts = load_benchmark("readouts")
    torch.manual_seed(1)
    encoder = build_encoder("small_cnn", in_channels=1, image_size=None).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    out = readouts.mean_std_at_size(encoder, x, 16)
    # a 2x trilinear downsampling (align_corners=False) is the mean of each 2^3 block's centre
    # pair per axis: the average of the 8 voxels of each block
    blocks = x.reshape(2, 1, 16, 2, 16, 2, 16, 2).mean(dim=(3, 5, 7))
    expected = readouts.readouts(readouts.stage_maps(encoder, blocks), blocks)["mean_std"]
    assert out.shape == expected.shape
    assert np.allclose(out, expected, atol=1e-5)


def test_brain_mean_std_summarises_the_brain_cells_only():
    readouts = load_benchmark("readouts")
    torch.manual_seed(2)
    # a map whose brain (the input's non-zero region) is whole cells of the map: the weighted
    # mean and spread are the plain ones over those cells
    x = torch.zeros(2, 1, 8, 8, 8)
    x[:, :, :4] = torch.rand(2, 1, 4, 8, 8) + 0.5
    t = torch.randn(2, 3, 4, 4, 4)  # a stage at half the resolution: brain = its first 2 slabs
    out = readouts._brain_mean_std(t, (x != 0).float())
    inside = t[:, :, :2].flatten(2)
    expected_mean = inside.mean(dim=2)
    expected_std = inside.std(dim=2, correction=0)
    assert torch.allclose(out, torch.cat([expected_std, expected_mean], dim=1), atol=1e-5)
    # the background no longer counts: changing it leaves the readout as it was
    t2 = t.clone()
    t2[:, :, 2:] += 100.0
    assert torch.allclose(readouts._brain_mean_std(t2, (x != 0).float()), out, atol=1e-5)
    full = readouts.readouts([t, t[:, :, ::2, ::2, ::2]], x)
    assert full["brain_mean_std"].shape == (2, 12)
    assert np.allclose(full["brain_mean_std"][:, :6], out.numpy(), atol=1e-5)
