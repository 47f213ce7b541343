"""participants.tsv / sessions.tsv reading and the join onto scans."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from nidl_dino.errors import UserError
from nidl_dino.workflow.participants import (
    merge_participants,
    missing_participants,
    read_participants,
    read_sessions,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(UserError) as excinfo:
        read_participants(path, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    return message


def scans(*rows: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "scan_id": ["_".join(filter(None, row)) for row in rows],
            "participant_id": [row[0] for row in rows],
            "session_id": [row[1] for row in rows],
            "path": [f"/d/{i}.nii" for i in range(len(rows))],
        }
    )


def test_bids_tsv_ids_normalised_missing_and_numbers(tmp_path, caplog):
    path = write(
        tmp_path / "participants.tsv",
        "participant_id\tage\tsex\tsite\nsub-01\t23.5\tF\t01\n02\tn/a\tM\t02\n sub-03 \t41\t\tNA\n",
    )
    with caplog.at_level(logging.WARNING):
        table = read_participants(path)
    assert caplog.text == ""  # valid BIDS: no warning
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["age"].tolist()[0] == 23.5 and pd.isna(table["age"][1])
    assert pd.api.types.is_numeric_dtype(table["age"])
    assert table["sex"].tolist()[:2] == ["F", "M"] and pd.isna(table["sex"][2])
    assert list(table.columns) == ["participant_id", "age", "sex", "site"]


def test_numeric_ids_keep_leading_zeros(tmp_path):
    table = read_participants(write(tmp_path / "p.tsv", "participant_id\tage\n007\t30\n"))
    assert table["participant_id"].tolist() == ["sub-007"]


def test_comma_separated_is_read_with_warning(tmp_path, caplog):
    path = write(
        tmp_path / "participants.tsv", 'participant_id,age,city\nsub-01,30,"Paris, France"\n'
    )
    table = read_participants(path)
    assert table["city"].tolist() == ["Paris, France"] and table["age"].tolist() == [30]
    assert "comma-separated" in caplog.text and "tab" in caplog.text


def test_semicolon_separated_with_decimal_comma(tmp_path, caplog):
    path = write(tmp_path / "participants.tsv", "participant_id;age;group\n01;23,5;a\n02;40;b\n")
    table = read_participants(path)
    assert table["age"].tolist() == [23.5, 40.0]
    assert table["group"].tolist() == ["a", "b"]
    assert "semicolon-separated" in caplog.text


def test_utf8_bom_is_silent(tmp_path, caplog):
    path = write(tmp_path / "p.tsv", "\ufeffparticipant_id\tville\n01\tGenève\n", "utf-8")
    with caplog.at_level(logging.WARNING):
        table = read_participants(path)
    assert list(table.columns) == ["participant_id", "ville"]
    assert table["ville"].tolist() == ["Genève"]
    assert caplog.text == ""


def test_latin1_is_read_with_warning(tmp_path, caplog):
    path = write(tmp_path / "p.tsv", "participant_id\tville\n01\tGenève\n02\tKöln\n", "latin-1")
    table = read_participants(path)
    assert table["ville"].tolist() == ["Genève", "Köln"]
    assert "not UTF-8" in caplog.text


def test_utf16_excel_export(tmp_path, caplog):
    path = write(tmp_path / "p.tsv", "\ufeffparticipant_id\tage\r\n01\t3\r\n", "utf-16-le")
    assert read_participants(path)["age"].tolist() == [3]
    assert "UTF-16" in caplog.text


def test_crlf_and_trailing_empty_columns(tmp_path):
    path = write(tmp_path / "p.tsv", "participant_id\tage\t\t\r\nsub-01\t30\t\t\r\n")
    assert list(read_participants(path).columns) == ["participant_id", "age"]


def test_required_ids(tmp_path):
    path = write(tmp_path / "p.tsv", "participant_id\n01\n02\n")
    assert len(read_participants(path, required_ids=["sub-01", "02"])) == 2
    message = error_of(path, required_ids=["01", "03"])
    assert "sub-03" in message and "p.tsv" in message and "sub-01" not in message


def test_error_duplicate_ids_names_them(tmp_path):
    path = write(tmp_path / "p.tsv", "participant_id\tage\n01\t1\nsub-01\t2\n02\t3\n03\t4\n03\t5\n")
    message = error_of(path)
    assert "'sub-01', 'sub-03'" in message and "more than once" in message and "p.tsv" in message


def test_error_missing_participant_id_column(tmp_path):
    message = error_of(write(tmp_path / "p.tsv", "subject\tage\n01\t3\n"))
    assert "no 'participant_id' column" in message and "'subject'" in message


def test_error_space_separated_hints_at_tabs(tmp_path):
    message = error_of(write(tmp_path / "p.tsv", "participant_id age\n01 3\n"))
    assert "participant_id" in message and "tab-separated" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("participant_id\tage\tage\n01\t1\t2\n", ["duplicate column", "'age'"]),
        ("participant_id\tage\n01\t1\t2\t3\n", ["line 2 has 4 fields", "header has 2", "tab"]),
        ("participant_id\tage\n\t3\n", ["empty participant_id", "line(s) '2'"]),
        ("\n\n", ["is empty"]),
    ],
)
def test_error_malformed(tmp_path, text, words):
    message = error_of(write(tmp_path / "p.tsv", text))
    assert all(word in message for word in words), message


def test_error_missing_file(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.tsv")


def test_merge_keeps_every_scan_and_warns_for_missing(tmp_path, caplog):
    participants = read_participants(
        write(tmp_path / "p.tsv", "participant_id\tage\n01\t30\n03\t50\n")
    )
    table = scans(("sub-01", "ses-1"), ("sub-02", "ses-1"), ("sub-01", "ses-2"))
    table.index = [10, 11, 12]
    merged = merge_participants(table, participants)
    assert merged["scan_id"].tolist() == table["scan_id"].tolist()
    assert list(merged.index) == [10, 11, 12]
    assert (
        merged["age"].tolist()[0] == 30 and pd.isna(merged["age"][11]) and merged["age"][12] == 30
    )
    assert missing_participants(table, participants) == ["sub-02"]
    assert "1 scanned subject(s) have no row in participants.tsv" in caplog.text
    assert "sub-02" in caplog.text


def test_merge_matches_ids_that_lost_leading_zeros(tmp_path, caplog):
    participants = read_participants(write(tmp_path / "p.csv", "participant_id,age\n1,30\n2,40\n"))
    merged = merge_participants(scans(("sub-001", ""), ("sub-2", "")), participants)
    assert merged["age"].tolist() == [30, 40]
    assert "leading zeros" in caplog.text


def test_merge_renames_clashing_columns(tmp_path):
    participants = read_participants(write(tmp_path / "p.tsv", "participant_id\tpath\n01\tx\n"))
    merged = merge_participants(scans(("sub-01", "")), participants)
    assert merged["path"].tolist() == ["/d/0.nii"] and merged["participants_path"].tolist() == ["x"]


def test_sessions_tsv_merge_session_value_wins(tmp_path):
    root = tmp_path / "bids"
    write(
        root / "sub-01" / "sub-01_sessions.tsv",
        "session_id\tage\tscanner\n1\t30.5\tA\nses-2\tn/a\tB\n",
    )
    write(root / "sub-02" / "sub-02_sessions.tsv", "session_id\tage\nses-1\t61\n")
    sessions = read_sessions(root, ["01", "sub-02", "sub-03"])
    assert sessions[["participant_id", "session_id"]].values.tolist() == [
        ["sub-01", "ses-1"],
        ["sub-01", "ses-2"],
        ["sub-02", "ses-1"],
    ]
    participants = read_participants(
        write(root / "participants.tsv", "participant_id\tage\tsex\n01\t30\tF\n02\t60\tM\n")
    )
    table = scans(
        ("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", "ses-1"), ("sub-03", "ses-1")
    )
    merged = merge_participants(table, participants, sessions)
    assert merged["age"].tolist()[:3] == [30.5, 30, 61]  # session age, else participant age
    assert pd.isna(merged["age"][3])
    assert merged["sex"].tolist()[:3] == ["F", "F", "M"]
    assert merged["scanner"].tolist()[:3] == ["A", "B", None] or pd.isna(merged["scanner"][2])
    assert list(merged.columns) == [
        "scan_id",
        "participant_id",
        "session_id",
        "path",
        "age",
        "sex",
        "scanner",
    ]


def test_sessions_tsv_absent_and_duplicate(tmp_path):
    assert read_sessions(tmp_path, ["01"]).empty
    path = write(tmp_path / "sub-01" / "sub-01_sessions.tsv", "session_id\n1\nses-1\n")
    with pytest.raises(UserError, match=r"sessions file .*'ses-1' more than once"):
        read_sessions(tmp_path, ["01"])
    path.write_text("visit\n1\n")
    with pytest.raises(UserError, match="no 'session_id' column"):
        read_sessions(tmp_path, ["01"])
