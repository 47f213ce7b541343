"""Intensity-histogram and tissue-class baselines (nidl_dino.evaluation.baselines), and the brain histogram
the extract job computes, on volumes whose brain intensities are known by construction."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from torch import nn

from nidl_dino.evaluation.baselines import (
    HISTOGRAM_BINS,
    TISSUE_COLUMNS,
    intensity_histogram_features,
    template_brain,
    tissue_class_features,
)

SHAPE = (40, 48, 40)  # a 4.5 mm grid over the MNI brain
AFFINE = np.array([[4.5, 0, 0, -90], [0, 4.5, 0, -126], [0, 0, 4.5, -72], [0, 0, 0, 1.0]])


def _volume(tmp_path, name, fractions, means, sd=0.02, seed=0):
    """Brain voxels drawn from three tissue intensities in the given fractions; 0 outside."""
    rng = np.random.default_rng(seed)
    brain = template_brain(SHAPE, AFFINE)
    labels = rng.choice(3, size=int(brain.sum()), p=fractions)
    values = np.asarray(means)[labels] + rng.normal(0, sd, len(labels))
    data = np.zeros(SHAPE, np.float32)
    data[brain] = values
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path, data[brain]


def _histogram_by_hand(values, bins):
    clipped = np.clip(values, 0.0, 1.0)
    index = np.minimum((clipped * bins).astype(int), bins - 1)
    return np.bincount(index, minlength=bins) / len(values)


def test_extraction_pass_histograms_the_template_brain(tmp_path):
    from nidl_dino.features.extract import extract_feature_sets

    a, values_a = _volume(tmp_path, "a", [0.2, 0.5, 0.3], [0.1, 0.5, 0.85], sd=0.1, seed=1)
    b, values_b = _volume(tmp_path, "b", [0.4, 0.3, 0.3], [0.05, 0.6, 0.9], sd=0.1, seed=2)

    class Mean(nn.Module):
        output_dim = 1

        def forward(self, x):
            return x.flatten(1).mean(1, keepdim=True)

    sets = extract_feature_sets(
        {"m": Mean()}, [str(a), str(b)], batch_size=2, accelerator="cpu", histogram_bins=16
    )
    expected = np.stack([_histogram_by_hand(values_a, 16), _histogram_by_hand(values_b, 16)])
    np.testing.assert_allclose(sets["brain_histogram"], expected, atol=1e-6)


def test_histogram_baseline_sums_neighbouring_bins():
    fine = np.random.default_rng(0).random((3, HISTOGRAM_BINS))
    fine /= fine.sum(axis=1, keepdims=True)
    coarse = intensity_histogram_features(fine, bins=32)
    assert coarse.shape == (3, 32)
    np.testing.assert_allclose(coarse[:, 0], fine[:, :4].sum(axis=1))
    np.testing.assert_allclose(coarse.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="cannot be grouped"):
        intensity_histogram_features(fine, bins=30)


def test_tissue_classes_recover_fractions_and_means():
    rng = np.random.default_rng(3)
    rows = []
    for fractions, means in (([0.15, 0.45, 0.40], [0.15, 0.55, 0.85]),
                             ([0.35, 0.35, 0.30], [0.15, 0.60, 0.85])):  # fmt: skip
        labels = rng.choice(3, size=200_000, p=fractions)
        values = np.asarray(means)[labels] + rng.normal(0, 0.04, len(labels))
        rows.append(_histogram_by_hand(values, HISTOGRAM_BINS))
    features = tissue_class_features(np.stack(rows))
    assert features.shape == (2, len(TISSUE_COLUMNS))
    np.testing.assert_allclose(features[0, :3], [0.15, 0.45, 0.40], atol=0.02)
    np.testing.assert_allclose(features[1, :3], [0.35, 0.35, 0.30], atol=0.02)
    np.testing.assert_allclose(features[1, 3:], [0.15, 0.60, 0.85], atol=0.01)
