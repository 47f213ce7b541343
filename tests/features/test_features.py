"""Feature extraction and per-scan tables (nidl_dino.features.extract)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from nidl_dino.features.extract import extract_features, write_subject_tables


class MeanAndMax(nn.Module):
    """(B, 1, D, H, W) -> (B, 2): the volume's mean and maximum, a readout written by hand."""

    output_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.amax(1)], dim=1)


def test_features_are_the_encoder_of_each_volume_in_order(tmp_path):
    rng = np.random.default_rng(0)
    volumes, paths = [], []
    for i in range(5):
        data = rng.random((6, 7, 8)).astype(np.float32) * (i + 1)
        path = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        volumes.append(data)
        paths.append(str(path))
    # batches of 2: the last one is short; order is the input order
    features = extract_features(MeanAndMax(), paths, batch_size=2, accelerator="cpu")
    expected = np.array([[v.mean(), v.max()] for v in volumes])
    assert features.dtype == np.float32 and features.shape == (5, 2)
    np.testing.assert_allclose(features, expected, rtol=1e-5)
    assert extract_features(MeanAndMax(), [], accelerator="cpu").shape == (0, 2)


def test_one_table_per_scan_with_ids_model_and_scan_id(tmp_path):
    scans = pd.DataFrame(
        {
            "scan_id": ["sub-01_ses-1", "sub-02"],
            "participant_id": ["sub-01", "sub-02"],
            "session_id": ["ses-1", None],
        }
    )
    features = np.array([[0.25, -1.0, 3.0], [1e-8, 2.0, 0.0]], dtype=np.float32)
    paths = write_subject_tables(features, scans, tmp_path / "features", "dino-x-123")
    assert [p.name for p in paths] == ["sub-01_ses-1.tsv", "sub-02.tsv"]
    table = pd.read_csv(paths[1], sep="\t", keep_default_na=False)
    assert list(table.columns) == [
        "participant_id", "session_id", "model_id", "scan_id",
        "feature_0000", "feature_0001", "feature_0002",
    ]  # fmt: skip
    assert table.iloc[0, :4].tolist() == ["sub-02", "", "dino-x-123", "sub-02"]
    # float32 written in its shortest decimal form: it reads back as the same float32
    np.testing.assert_array_equal(table.iloc[0, 4:].to_numpy(float).astype(np.float32), features[1])
