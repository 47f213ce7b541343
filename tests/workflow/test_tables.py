"""QC table and layout helpers (nidl_dino.workflow.tables)."""

from __future__ import annotations

import os

import pandas as pd

from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import (
    QC_LEADING_COLUMNS,
    ok_volumes,
    qc_table,
    read_qc_table,
    write_table_atomic,
)


def test_qc_table_puts_contract_columns_first_and_flattens_records():
    records = [
        {
            "scan_id": "sub-01",
            "participant_id": "sub-01",
            "session_id": None,
            "status": "ok",
            "reason": None,
            "metrics": {"etiv_ml": 1500.0, "registration": {"similarity": 0.9}},
            "input": {"shape": [10, 11, 12]},
            "steps": {"n4": {"iterations": [20, 20]}},
        },
        {"scan_id": "sub-02", "participant_id": "sub-02", "status": "excluded", "reason": "bad"},
    ]
    table = qc_table(records)
    assert list(table.columns[:4]) == QC_LEADING_COLUMNS
    assert table["session_id"].tolist() == ["", ""]
    assert table["reason"].tolist() == ["", "bad"]
    assert table.loc[0, "metrics.registration.similarity"] == 0.9
    assert table.loc[0, "input.shape"] == "[10, 11, 12]"  # lists as JSON text
    assert not any(c.startswith("steps") for c in table.columns)


def test_write_then_read_keeps_ids_as_text_and_empty_reasons(tmp_path):
    table = qc_table(
        [
            {"scan_id": "sub-007", "participant_id": "sub-007", "session_id": "ses-01",
             "status": "ok", "reason": "", "metrics": {"x": None}},
            {"scan_id": "sub-008", "participant_id": "sub-008", "session_id": "",
             "status": "excluded", "reason": "all-zero volume", "metrics": {"x": 1.5}},
        ]
    )  # fmt: skip
    path = tmp_path / "qc" / "qc.tsv"
    write_table_atomic(table, path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    back = read_qc_table(path)
    assert back["participant_id"].tolist() == ["sub-007", "sub-008"]
    assert back["session_id"].tolist() == ["ses-01", ""]
    assert back["reason"].tolist() == ["", "all-zero volume"]
    assert pd.isna(back.loc[0, "metrics.x"]) and back.loc[1, "metrics.x"] == 1.5
    assert "n/a" in path.read_text()  # missing values as BIDS writes them


def test_parquet_by_suffix_and_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_table_atomic(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet")
    finally:
        os.umask(old)
    assert pd.read_parquet(tmp_path / "t.parquet")["a"].tolist() == [1, 2]
    assert (tmp_path / "t.parquet").stat().st_mode & 0o777 == 0o640


def test_ok_volumes_in_qc_order(tmp_path):
    qc = pd.DataFrame(
        {"scan_id": ["sub-b", "sub-a", "sub-c_ses-1"], "status": ["ok", "excluded", "ok"]}
    )
    layout = Layout(tmp_path, spacing_mm=2.0, sources={"sub-b": "sub-b_run-1"})
    assert ok_volumes(qc, layout) == [
        f"{tmp_path}/sub-b/anat/sub-b_run-1_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
        f"{tmp_path}/sub-c/ses-1/anat/sub-c_ses-1_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
    ]
