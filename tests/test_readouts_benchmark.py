"""benchmarks/readouts.py reads the same numbers out of an encoder as the workflow's readout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from nidl_dino.encoders.networks import build_encoder
from nidl_dino.encoders.readout import StagePooling

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "readouts.py"


def load_script():
    spec = importlib.util.spec_from_file_location("readouts_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_std_is_the_workflows_readout_and_subsets_partition_it():
    readouts = load_script()
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
