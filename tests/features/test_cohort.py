"""The cohort table (nidl_dino.features.cohort): one row per scan, joined on scan_id."""

from __future__ import annotations

import pandas as pd
import pytest

from nidl_dino.features.cohort import cohort_table, feature_columns, read_manifest_tables


def _qc(rows):
    return pd.DataFrame(
        rows, columns=["participant_id", "session_id", "scan_id", "status", "reason", "snr"]
    )


def _table(folder, scan_id, pid, ses, values):
    row = {"participant_id": pid, "session_id": ses, "model_id": "dino-x", "scan_id": scan_id}
    row.update(zip(feature_columns(len(values)), values, strict=True))
    path = folder / f"{scan_id}.tsv"
    pd.DataFrame([row]).to_csv(path, sep="\t", index=False)
    return path


def test_feature_columns_are_zero_padded_to_at_least_four_digits():
    assert feature_columns(3) == ["feature_0000", "feature_0001", "feature_0002"]
    assert feature_columns(12345)[-1] == "feature_12344"


def test_two_runs_of_one_session_give_two_rows_with_their_own_features(tmp_path):
    # inputs.run_policy: all -> two scans share participant and session
    qc = _qc(
        [
            ["sub-01", "ses-1", "sub-01_ses-1_run-1", "ok", "", 10.0],
            ["sub-01", "ses-1", "sub-01_ses-1_run-2", "ok", "", 11.0],
            ["sub-02", "ses-1", "sub-02_ses-1", "excluded", "all-zero volume", None],
        ]
    )
    tables = [
        _table(tmp_path, "sub-01_ses-1_run-1", "sub-01", "ses-1", [1.0, 2.0]),
        _table(tmp_path, "sub-01_ses-1_run-2", "sub-01", "ses-1", [3.0, 4.0]),
    ]
    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "age": [30.0, 40.0]})
    cohort = cohort_table(qc, tables, participants)
    assert len(cohort) == 3
    assert list(cohort["scan_id"]) == list(qc["scan_id"])
    assert list(cohort.columns[:5]) == [
        "participant_id",
        "session_id",
        "scan_id",
        "status",
        "reason",
    ]
    by_scan = cohort.set_index("scan_id")
    assert by_scan.loc["sub-01_ses-1_run-1", "feature_0001"] == 2.0
    assert by_scan.loc["sub-01_ses-1_run-2", "feature_0000"] == 3.0
    assert pd.isna(by_scan.loc["sub-02_ses-1", "feature_0000"])
    assert list(by_scan["age"]) == [30.0, 30.0, 40.0]
    assert (by_scan["model_id"].iloc[:2] == "dino-x").all()


def test_old_tables_without_scan_id_join_by_file_name(tmp_path):
    qc = _qc([["sub-01", "", "sub-01", "ok", "", 1.0]])
    path = tmp_path / "sub-01.tsv"
    pd.DataFrame(
        [{"participant_id": "sub-01", "session_id": "", "model_id": "m", "feature_0000": 5.0}]
    ).to_csv(path, sep="\t", index=False)
    cohort = cohort_table(qc, [path])
    assert cohort["feature_0000"].tolist() == [5.0]


def test_manifest_tables_absent_or_unreadable_is_empty(tmp_path):
    assert read_manifest_tables(tmp_path / "absent.tsv") == []
    bad = tmp_path / "bad.tsv"
    bad.write_text("no table column\n1\n")
    assert read_manifest_tables(bad) == []
    good = tmp_path / "manifest.tsv"
    pd.DataFrame({"scan_id": ["a", "b"], "table": ["a.tsv", "b.tsv"]}).to_csv(
        good, sep="\t", index=False
    )
    assert read_manifest_tables(good) == ["a.tsv", "b.tsv"]


def test_feature_tables_for_the_same_scan_twice_are_refused(tmp_path):
    qc = _qc([["sub-01", "", "sub-01", "ok", "", 1.0]])
    (tmp_path / "a").mkdir()
    first = _table(tmp_path, "sub-01", "sub-01", "", [1.0])
    second = _table(tmp_path / "a", "sub-01", "sub-01", "", [2.0])
    with pytest.raises(ValueError, match="two feature tables"):
        cohort_table(qc, [first, second])


def test_streamed_files_hold_the_same_rows_as_the_table_in_memory(tmp_path):
    from nidl_dino.features.cohort import iter_cohort_chunks, write_cohort

    n = 23
    rows, tables = [], []
    for i in range(n):
        scan = f"sub-{i:02d}"
        ok = i % 5 != 3
        rows.append([scan, "", scan, "ok" if ok else "excluded", "" if ok else "bad", float(i)])
        if ok:
            tables.append(_table(tmp_path, scan, scan, "", [i + 0.5, -i, i * 1e-7]))
    qc = _qc(rows)
    participants = pd.DataFrame(
        {"participant_id": [f"sub-{i:02d}" for i in range(n)], "sex": ["F", "M"] * 11 + ["F"]}
    )
    expected = cohort_table(qc, tables, participants)
    # chunks of 4: the features of scans in later chunks, excluded scans inside chunks
    chunks = iter_cohort_chunks(qc, tables, participants, chunk_rows=4)
    assert write_cohort(chunks, tmp_path / "c.tsv", tmp_path / "c.parquet") == n
    parquet = pd.read_parquet(tmp_path / "c.parquet")
    tsv = pd.read_csv(tmp_path / "c.tsv", sep="\t", keep_default_na=False, na_values=["n/a"])
    for table in (parquet, tsv):
        assert list(table.columns) == list(expected.columns)
        assert list(table["scan_id"]) == list(qc["scan_id"])
        features = [c for c in table.columns if c.startswith("feature_")]
        pd.testing.assert_frame_equal(
            table[features].astype(float), expected[features].astype(float), rtol=0, atol=0
        )
        assert table["feature_0000"].iloc[0] == 0.5 and pd.isna(table["feature_0000"].iloc[3])
        assert list(table["sex"].astype(str)) == list(participants["sex"])
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files renamed or removed
