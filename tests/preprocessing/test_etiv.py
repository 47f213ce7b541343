"""Head size as FreeSurfer's eTIV: formula, config key removed, the column in the cohort table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nidl_dino.errors import UserError
from nidl_dino.features.cohort import cohort_table
from nidl_dino.preprocessing.config import merge_config
from nidl_dino.preprocessing.registration import etiv_ml


def test_etiv_is_freesurfers_scale_factor_times_the_determinant():
    # FreeSurfer: eTIV = 1948.106 cm3 / det(subject -> MNI305); our transform goes template ->
    # subject, so its determinant is the reciprocal of FreeSurfer's.
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scales = np.diag([0.9, 0.85, 0.95])
    transform = np.eye(4)
    transform[:3, :3] = rotation @ scales
    transform[:3, 3] = [3.0, -7.0, 11.0]
    talairach = np.linalg.inv(transform)  # subject -> template, FreeSurfer's direction
    expected = 1948.106 / abs(np.linalg.det(talairach[:3, :3]))
    assert etiv_ml(transform) == pytest.approx(expected)
    assert etiv_ml(transform) == pytest.approx(1948.106 * 0.9 * 0.85 * 0.95)
    # An average adult head: determinant subject -> MNI about 1.3 reads 1400-1600 ml.
    assert 1400 <= etiv_ml(np.diag([1 / 1.3 ** (1 / 3)] * 3 + [1.0])) <= 1600


def test_removed_brain_volume_bound_is_a_one_line_error():
    with pytest.raises(UserError, match=r"qc\.brain_volume_ml was removed.*etiv_ml") as err:
        merge_config({"qc": {"brain_volume_ml": [900, 2600]}})
    assert "\n" not in str(err.value)


def test_cohort_table_carries_etiv_after_participant_columns(tmp_path):
    qc = pd.DataFrame(
        {
            "participant_id": ["sub-01", "sub-02"],
            "session_id": ["", ""],
            "scan_id": ["sub-01", "sub-02"],
            "status": ["ok", "excluded"],
            "reason": ["", "bad"],
            "metrics.registration_similarity": [0.9, np.nan],
            "metrics.etiv_ml": [1523.4, np.nan],
        }
    )
    features = tmp_path / "sub-01.tsv"
    features.write_text("participant_id\tsession_id\tmodel_id\tfeature_0000\nsub-01\t\tm\t0.5\n")
    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "age": [30, 40]})
    table = cohort_table(qc, [features], participants)
    assert list(table.columns[:8]) == [
        "participant_id", "session_id", "scan_id", "status", "reason", "age", "etiv_ml",
        "model_id",
    ]  # fmt: skip
    assert table["etiv_ml"].iloc[0] == 1523.4 and np.isnan(table["etiv_ml"].iloc[1])
    assert "registration_similarity" not in table.columns
