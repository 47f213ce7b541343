"""The template fit of the bias field (``bias.template_bias_field``) on images made from the
template's own tissue index, where the true field is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from nidl_dino.preprocessing.bias import template_bias_field
from nidl_dino.preprocessing.template import tissue_index_at

WORKING_MM = 4.0
PARAMS = {"degree": 2, "bins": 16, "erosion_mm": 8.0, "trim": 0.35}


def log_spread(field: np.ndarray) -> float:
    p5, p95 = np.percentile(np.log(field), [5, 95])
    return float(p95 - p5)


@pytest.fixture(scope="module")
def tissue():
    index, affine = tissue_index_at(WORKING_MM)
    return np.asarray(index, dtype=np.float64), affine


def quadratic_field(shape, affine, coef) -> np.ndarray:
    """``exp(c . (x, y, z, x^2, y^2, z^2, xy, xz, yz))`` of world decimetres."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]) / 100.0
    terms = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
    return np.exp(np.asarray(coef) @ terms).reshape(shape)


def inside(tissue_index: np.ndarray) -> np.ndarray:
    return tissue_index > 0.9  # deep white matter, far from the edges


def test_the_tissue_index_is_one_third_csf_two_thirds_gm_one_wm(tissue):
    index, affine = tissue
    assert index.min() >= 0.0 and index.max() <= 1.0 + 1e-6
    assert abs(affine[0, 0]) == pytest.approx(WORKING_MM)
    brain = index > 0
    assert 0.5 < np.median(index[brain]) < 1.0  # mostly grey and white matter
    assert (index > 0.95).sum() > 1000  # pure white matter exists at 4 mm


def test_a_known_quadratic_field_is_recovered(tissue):
    index, affine = tissue
    contrast = 0.05 + 2.0 * index**3  # any monotone tissue contrast
    true = quadratic_field(index.shape, affine, [0.3, -0.4, 0.2, 0.5, -0.3, 0.4, 0.2, -0.3, 0.1])
    estimated = template_bias_field(contrast * true, affine, np.eye(4), PARAMS, WORKING_MM)
    brain = index > 0.5
    assert log_spread(true[brain]) > 0.3  # a strong field
    # a tenth of it at most is left: g is a step function of 16 bins, the contrast is not
    assert log_spread(true[brain] / estimated[brain]) < 0.03


def test_no_field_is_found_where_there_is_none(tissue):
    index, affine = tissue
    # a non-monotone contrast (CSF brighter than grey matter, as in a T2w) has no field either
    image = np.where(index > 0, 1.0 + np.abs(index - 0.55), 0.0)
    estimated = template_bias_field(image, affine, np.eye(4), PARAMS, WORKING_MM)
    assert log_spread(estimated[index > 0.5]) < 0.01


def test_lesions_are_trimmed_not_fitted(tissue):
    index, affine = tissue
    rng = np.random.default_rng(0)
    true = quadratic_field(index.shape, affine, [0.2, 0.3, -0.2, -0.4, 0.3, 0.2, 0.0, 0.1, -0.2])
    image = (0.1 + index) * true
    # dark blobs in a fifth of the white matter, on one side only (a field would explain them)
    wm = np.argwhere((index > 0.9) & (np.indices(index.shape)[0] < index.shape[0] // 2))
    hit = wm[rng.random(len(wm)) < 0.4]
    image[tuple(hit.T)] *= 0.4
    estimated = template_bias_field(image, affine, np.eye(4), PARAMS, WORKING_MM)
    brain = index > 0.5
    assert log_spread(true[brain] / estimated[brain]) < 0.03


def test_the_field_follows_the_registration(tissue):
    index, affine = tissue
    # the subject is the template shifted by 10 mm along x: its grid's world is shifted too
    shift = np.eye(4)
    shift[0, 3] = 10.0
    subject_affine = shift @ affine
    true = quadratic_field(index.shape, subject_affine, [0.4, 0, 0, 0.4, 0, 0, 0, 0, 0])
    image = (0.1 + index) * true
    estimated = template_bias_field(image, subject_affine, shift, PARAMS, WORKING_MM)
    right = log_spread(true[index > 0.5] / estimated[index > 0.5])
    assert right < 0.03
    # with the wrong transform the tissues do not line up, and the fit is worse
    wrong = template_bias_field(image, subject_affine, np.eye(4), PARAMS, WORKING_MM)
    assert log_spread(true[index > 0.5] / wrong[index > 0.5]) > 2 * right


def test_too_little_brain_in_the_image_gives_none(tissue):
    index, affine = tissue
    far = np.eye(4)
    far[0, 3] = 500.0  # the template brain lies outside this image
    assert template_bias_field(np.ones(index.shape), affine, far, PARAMS, WORKING_MM) is None
