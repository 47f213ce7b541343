"""Intensity-histogram and tissue-class baselines (nidl_dino.baselines) on volumes whose
brain intensities are known by construction."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from nidl_dino.baselines import (
    TISSUE_COLUMNS,
    _template_brain,
    intensity_histogram_features,
    tissue_class_features,
)

SHAPE = (40, 48, 40)  # a 4.5 mm grid over the MNI brain
AFFINE = np.array([[4.5, 0, 0, -90], [0, 4.5, 0, -126], [0, 0, 4.5, -72], [0, 0, 0, 1.0]])


def _volume(tmp_path, name, fractions, means, seed=0):
    """Brain voxels drawn from three tissue intensities in the given fractions; 0 outside."""
    rng = np.random.default_rng(seed)
    brain = _template_brain(SHAPE, AFFINE)
    n = int(brain.sum())
    labels = rng.choice(3, size=n, p=fractions)
    values = np.asarray(means)[labels] + rng.normal(0, 0.02, n)
    data = np.zeros(SHAPE, np.float32)
    data[brain] = values
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path, values


def test_histogram_is_the_fraction_of_brain_voxels_per_bin(tmp_path):
    path, values = _volume(tmp_path, "a", [0.2, 0.5, 0.3], [0.1, 0.5, 0.85])
    features = intensity_histogram_features([path], bins=4)
    # by hand: quarters of [0, 1], values outside clipped to the end bins
    clipped = np.clip(values, 0, 1)
    expected = [np.mean((clipped >= lo) & (clipped < lo + 0.25)) for lo in (0, 0.25, 0.5)]
    expected.append(1 - sum(expected))
    np.testing.assert_allclose(features[0], expected, atol=1e-6)
    assert features.shape == (1, 4)


def test_tissue_classes_recover_fractions_and_means(tmp_path):
    young, _ = _volume(tmp_path, "young", [0.15, 0.45, 0.40], [0.15, 0.55, 0.85], seed=1)
    old, _ = _volume(tmp_path, "old", [0.35, 0.35, 0.30], [0.15, 0.60, 0.85], seed=2)
    features = tissue_class_features([young, old], max_voxels=5000)
    assert features.shape == (2, len(TISSUE_COLUMNS))
    np.testing.assert_allclose(features[0, :3], [0.15, 0.45, 0.40], atol=0.03)
    np.testing.assert_allclose(features[1, :3], [0.35, 0.35, 0.30], atol=0.03)
    np.testing.assert_allclose(features[1, 3:], [0.15, 0.60, 0.85], atol=0.02)
