"""benchmarks/teacher_transfer.py: the workflow's readout in batches, and its cohort x teacher table."""

from __future__ import annotations

import pandas as pd
import torch
from benchmark_scripts import load_benchmark

from nidl_dino.encoders.networks import build_encoder
from nidl_dino.encoders.readout import StagePooling


def test_features_in_batches_are_the_workflows_readout():
    transfer = load_benchmark("teacher_transfer")
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", in_channels=1, image_size=None).eval()
    x = torch.rand(5, 1, 24, 24, 24)
    out = transfer.features(encoder, x, batch=2)  # batches of 2, 2 and 1
    with torch.no_grad():
        whole = StagePooling(encoder, std=True).eval()(x)
    assert out.shape == (5, 2 * (16 + 32 + 64 + 128))
    assert torch.allclose(out, whole, atol=1e-5)


def test_markdown_puts_each_score_in_its_cohort_row_and_feature_set_column():
    transfer = load_benchmark("teacher_transfer")

    def frame(values):
        return pd.DataFrame(
            [
                {"feature_set": k, "target": "age", "metric": "mae", "mean": m, "std": s}
                for k, (m, s) in values.items()
            ]
            + [{"feature_set": "x", "target": "sex", "metric": "roc_auc", "mean": 0.9, "std": 0}]
        )

    scores = {
        "a": frame({"teacher of a": (7.0, 1.0), "histogram": (6.5, 0.5)}),
        "b": frame({"teacher of a": (8.25, 0.75), "teacher of b": (9.0, 1.125)}),
    }
    lines = transfer.markdown(scores, "age", "mae").splitlines()
    assert lines[0] == "| probed on | teacher of a | histogram | teacher of b |"
    assert lines[2] == "| a | 7.00 ± 1.00 | 6.50 ± 0.50 |  |"
    assert lines[3] == "| b | 8.25 ± 0.75 |  | 9.00 ± 1.12 |"
