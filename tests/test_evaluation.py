"""Evaluation helpers: PCA size bound and feature-set alignment with the cohort rows."""

import math

import numpy as np
import pandas as pd
import pytest

from nidl_dino.evaluation import _largest_pca


@pytest.mark.parametrize("n, n_splits, inner", [(21, 5, 3), (200, 5, 3), (6, 2, 2), (4, 2, 2)])
def test_largest_pca_fits_the_smallest_inner_training_fold(n, n_splits, inner):
    # smallest outer training fold: n minus the largest test fold (ceil(n / n_splits));
    # smallest inner training fold likewise; PCA needs at most rows - 1 components
    outer = n - math.ceil(n / n_splits)
    inner_train = outer - math.ceil(outer / inner)
    expected = max(1, inner_train - 1)
    assert _largest_pca(n, {"n_splits": n_splits, "inner_splits": inner}) == expected
    from sklearn.decomposition import PCA

    if inner_train >= 2:  # a PCA of that size really fits that many rows
        x = np.random.default_rng(0).normal(size=(inner_train, inner_train + 10))
        PCA(n_components=expected).fit(x)


def test_feature_sets_align_with_ok_rows(tmp_path):
    import nibabel as nib
    import torch

    from nidl_dino.encoders import build_encoder
    from nidl_dino.evaluation import feature_sets_for
    from nidl_dino.features import save_teacher

    rng = np.random.default_rng(0)
    scans = [f"sub-{i:02d}" for i in range(5)]
    status = ["ok", "excluded", "ok", "ok", "ok"]
    for scan in scans:
        folder = tmp_path / "preproc" / scan
        folder.mkdir(parents=True)
        img = nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4))
        nib.save(img, folder / f"{scan}_desc-preproc_T1w.nii.gz")
    qc = pd.DataFrame(
        {
            "participant_id": scans,
            "session_id": [""] * 5,
            "status": status,
            "reason": ["", "bad", "", "", ""],
            "scan_id": scans,
            "metrics.brain_volume_ml": [1000.0, np.nan, 1100.0, 1200.0, 1300.0],
        }
    )
    cohort = qc[["participant_id", "session_id", "status", "reason"]].copy()
    cohort["age"] = [20, 30, 40, 50, 60]
    cohort["feature_0000"] = [0.1, np.nan, 0.3, 0.4, 0.5]
    torch.manual_seed(0)
    encoder = build_encoder({"name": "small_cnn", "kwargs": {}})
    teacher = tmp_path / "teacher.pt"
    save_teacher(encoder, {"name": "small_cnn", "kwargs": {}}, teacher)
    table, sets = feature_sets_for(cohort, qc, teacher, tmp_path / "preproc", {"seed": 0})
    assert list(table["participant_id"]) == ["sub-00", "sub-02", "sub-03", "sub-04"]
    assert sets["dino"][:, 0].tolist() == pytest.approx([0.1, 0.3, 0.4, 0.5])
    assert sets["brain_volume"][:, 0].tolist() == [1000.0, 1100.0, 1200.0, 1300.0]
    assert sets["random_encoder"].shape == (4, encoder.output_dim)
    assert sets["intensity_pca"].X.shape[0] == 4
