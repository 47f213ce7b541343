"""Evaluation helpers: PCA size bound and feature-set alignment with the cohort rows."""

import math

import numpy as np
import pandas as pd
import pytest

from nidl_dino.errors import UserError
from nidl_dino.evaluation.probing import _largest_pca
from nidl_dino.workflow.layout import Layout


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


def _cohort_with_teacher(tmp_path):
    import nibabel as nib
    import torch

    from nidl_dino.encoders.networks import build_encoder
    from nidl_dino.features.teacher import save_teacher

    rng = np.random.default_rng(0)
    scans = [f"sub-{i:02d}" for i in range(5)]
    status = ["ok", "excluded", "ok", "ok", "ok"]
    for scan in scans:
        path = Layout(tmp_path).scan(scan).volume
        path.parent.mkdir(parents=True)
        volume = rng.random((16, 16, 18)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    qc = pd.DataFrame(
        {
            "participant_id": scans,
            "session_id": [""] * 5,
            "status": status,
            "reason": ["", "bad", "", "", ""],
            "scan_id": scans,
            "metrics.etiv_ml": [1000.0, np.nan, 1100.0, 1200.0, 1300.0],
        }
    )
    cohort = qc[["participant_id", "session_id", "scan_id", "status", "reason"]].copy()
    cohort["age"] = [20, 30, 40, 50, 60]
    cohort["feature_0000"] = [0.1, np.nan, 0.3, 0.4, 0.5]
    torch.manual_seed(0)
    encoder = build_encoder({"name": "small_cnn", "kwargs": {}})
    teacher = tmp_path / "teacher.pt"
    save_teacher(encoder, {"name": "small_cnn", "kwargs": {}}, teacher)
    return cohort, qc, teacher, encoder


def _extract(tmp_path, qc, teacher, seed=0, pca_downsample=4, **extract):
    from nidl_dino.features.extract import extract_cohort

    config = {
        "trainer": {"accelerator": "cpu"},
        "extract": {"batch_size": 2, **extract},
        "seed": seed,
        "probes": {"pca": {"downsample": pca_downsample}},
    }
    out = tmp_path / "features"
    extract_cohort(teacher, qc, Layout(tmp_path), out / "manifest.tsv", config, out / "base")
    return {
        "random_encoder": out / "base" / "random_encoder.parquet",
        "intensities": out / "base" / "intensities.parquet",
    }


def test_feature_sets_align_with_ok_rows_and_read_the_extract_jobs_tables(tmp_path):
    from nidl_dino.encoders.readout import feature_encoder
    from nidl_dino.evaluation.baselines import downsampled_intensities
    from nidl_dino.evaluation.probing import feature_sets_for, random_encoder_like
    from nidl_dino.features.extract import extract_features
    from nidl_dino.workflow.tables import ok_volumes

    cohort, qc, teacher, encoder = _cohort_with_teacher(tmp_path)
    # the extract job computes the baselines' inputs; the probes only read them
    baselines = _extract(tmp_path, qc, teacher, seed=3, pca_downsample=4)
    table, sets = feature_sets_for(cohort, qc, baselines, {"seed": 0, "pca": {"downsample": 4}})
    assert list(table["participant_id"]) == ["sub-00", "sub-02", "sub-03", "sub-04"]
    assert sets["dino"][:, 0].tolist() == pytest.approx([0.1, 0.3, 0.4, 0.5])
    assert sets["brain_volume"][:, 0].tolist() == [1000.0, 1100.0, 1200.0, 1300.0]
    # read out like the DINO features: std and mean of every stage of small_cnn by default,
    # from DINO's initial weights (encoder_seed), the same numbers a separate pass would give
    volumes = ok_volumes(qc, Layout(tmp_path))
    expected = extract_features(
        feature_encoder(random_encoder_like(teacher, seed=3), "stages_mean_std"),
        volumes,
        accelerator="cpu",
    )
    assert sets["random_encoder"].shape == (4, 2 * (16 + 32 + 64 + 128))
    np.testing.assert_allclose(sets["random_encoder"], expected, rtol=1e-5, atol=1e-6)
    # 4^3 block means of the 16 x 16 x 18 volumes (the trailing 2 slices dropped)
    assert sets["intensity_pca"].X.shape == (4, 4 * 4 * 4)
    np.testing.assert_allclose(
        sets["intensity_pca"].X, downsampled_intensities(volumes, 4), rtol=1e-5, atol=1e-6
    )
    # a cohort row the tables do not have: rerun extract
    rows, renamed = qc.copy(), cohort.copy()
    rows.loc[rows["scan_id"] == "sub-02", "scan_id"] = "sub-99"
    renamed.loc[renamed["scan_id"] == "sub-02", "scan_id"] = "sub-99"
    with pytest.raises(UserError, match="rerun extract"):
        feature_sets_for(renamed, rows, baselines, {"seed": 0})
    # another downsampling than the tables': rerun extract
    with pytest.raises(UserError, match="probes.pca.downsample"):
        feature_sets_for(cohort, qc, baselines, {"seed": 0, "pca": {"downsample": 2}})
    baselines = _extract(tmp_path, qc, teacher, pooling="last", pca_downsample=4)
    _, sets = feature_sets_for(cohort, qc, baselines, {"seed": 0})
    assert sets["random_encoder"].shape == (4, encoder.output_dim)


def test_random_encoder_baseline_is_the_trained_encoders_starting_point(tmp_path):
    """encoder_seed (the workflow's seed) fixes the random weights; probes.seed does not."""
    import torch

    from nidl_dino.encoders.networks import build_encoder
    from nidl_dino.evaluation.probing import random_encoder_like
    from nidl_dino.features.teacher import save_teacher

    spec = {"name": "small_cnn", "kwargs": {}}
    teacher = tmp_path / "teacher.pt"
    save_teacher(build_encoder(spec), spec, teacher)
    torch.manual_seed(3)  # what training does with seed: 3
    start = build_encoder(spec).state_dict()
    baseline = random_encoder_like(teacher, seed=3).state_dict()
    assert all(torch.equal(start[k], baseline[k]) for k in start)


def test_probe_targets_uses_probes_seed_for_the_folds():
    from nidl_dino.evaluation.probing import probe_targets

    rng = np.random.default_rng(0)
    n = 40
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(n)],
            "age": rng.uniform(20, 80, n),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    x = np.column_stack([table["age"] + rng.normal(0, 10, n), rng.normal(size=n)])
    config = {"targets": ["age", "sex", "diagnosis"], "n_splits": 4, "n_repeats": 1}
    first, _, note = probe_targets({"f": x}, table, {**config, "seed": 0})
    again, _, _ = probe_targets({"f": x}, table, {**config, "seed": 0})
    other, _, _ = probe_targets({"f": x}, table, {**config, "seed": 1})
    assert "diagnosis" in note  # a missing target is named, the others still run
    assert set(first["target"]) == {"age", "sex"}
    pd.testing.assert_frame_equal(first, again)
    age = first["target"] == "age"
    assert not np.allclose(
        first.loc[age].select_dtypes("number"), other.loc[age].select_dtypes("number")
    )
    no_chance, _, _ = probe_targets({"f": x}, table, {**config, "seed": 0}, include_chance=False)
    assert "chance" not in set(no_chance["feature_set"])
