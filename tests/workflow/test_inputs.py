"""Input discovery: BIDS walk, scans table, filters, run policy, scan ids and error messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nidl_dino.errors import UserError
from nidl_dino.workflow.inputs import (
    discover_scans,
    participants_tsv_path,
    resolve_inputs_config,
    scan_id_wildcard_constraint,
)


def touch(path: Path, content: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def bids_file(
    root: Path, sub: str, ses: str = "", entities: str = "", ext: str = ".nii.gz"
) -> Path:
    """Create ``sub-<sub>/[ses-<ses>/]anat/sub-<sub>[_ses-<ses>]<entities>_T1w<ext>`` (empty)."""
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + entities + f"_T1w{ext}"
    return touch(folder / name)


def error_of(cfg: dict) -> str:
    """Run discover_scans expecting a UserError; check the message is one line and return it."""
    with pytest.raises(UserError) as excinfo:
        discover_scans(cfg)
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    return message


@pytest.fixture
def sessions_tree(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    for sub in ("02", "01", "10"):
        for ses in ("1", "2"):
            bids_file(root, sub, ses)
    touch(root / "dataset_description.json", b"{}")
    return root


def test_tree_without_sessions_mixed_extensions(tmp_path):
    root = tmp_path / "bids"
    bids_file(root, "b", ext=".nii")
    bids_file(root, "a", ext=".nii.gz")
    touch(root / "sub-a" / "anat" / "sub-a_T1w.json", b"{}")
    touch(root / "sub-a" / "anat" / "sub-a_T2w.nii.gz")
    table = discover_scans({"bids_dir": str(root)})
    assert list(table.columns[:4]) == ["scan_id", "participant_id", "session_id", "path"]
    assert {"acq", "ce", "rec", "run"} <= set(table.columns)
    assert table["scan_id"].tolist() == ["sub-a", "sub-b"]
    assert table["participant_id"].tolist() == ["sub-a", "sub-b"]
    assert table["session_id"].tolist() == ["", ""]
    assert table["path"].tolist() == [
        str(root / "sub-a/anat/sub-a_T1w.nii.gz"),
        str(root / "sub-b/anat/sub-b_T1w.nii"),
    ]


def test_tree_with_sessions_sorted_and_relative_bids_dir(sessions_tree, monkeypatch):
    monkeypatch.chdir(sessions_tree.parent)
    table = discover_scans({"bids_dir": "bids"})
    assert table["scan_id"].tolist() == [
        f"sub-{sub}_ses-{ses}" for sub in ("01", "02", "10") for ses in ("1", "2")
    ]
    assert table["session_id"].tolist() == ["ses-1", "ses-2"] * 3
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in table["path"])


def test_whole_config_with_inputs_section(sessions_tree):
    config = {"bids_dir": str(sessions_tree), "output_dir": "out", "inputs": {"sessions": ["2"]}}
    table = discover_scans(config)
    assert table["session_id"].unique().tolist() == ["ses-2"]
    table = discover_scans({"bids_dir": str(sessions_tree), "output_dir": "out", "inputs": None})
    assert len(table) == 6


def test_real_nifti_is_found(tmp_path):
    root = tmp_path / "bids"
    path = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    assert discover_scans({"bids_dir": root})["path"].tolist() == [str(path)]


def test_derivatives_sourcedata_and_hidden_are_ignored(tmp_path):
    root = tmp_path / "bids"
    bids_file(root, "01")
    bids_file(root / "derivatives" / "fmriprep", "01")
    bids_file(root / "sourcedata", "01")
    bids_file(root / ".heudiconv", "01")
    touch(root / "sub-01" / "anat" / "._sub-01_T1w.nii.gz")  # macOS resource fork
    bids_file(root / "sub-01" / ".git", "01")
    table = discover_scans({"bids_dir": root})
    assert table["path"].tolist() == [str(root / "sub-01/anat/sub-01_T1w.nii.gz")]


def test_filters_sessions_include_exclude_with_and_without_prefix(sessions_tree):
    base = {"bids_dir": str(sessions_tree)}
    table = discover_scans({**base, "sessions": ["ses-1"], "include_subjects": ["01", "sub-02"]})
    assert table["scan_id"].tolist() == ["sub-01_ses-1", "sub-02_ses-1"]
    table = discover_scans({**base, "sessions": "2", "exclude_subjects": ["sub-01", "10"]})
    assert table["scan_id"].tolist() == ["sub-02_ses-2"]


def test_exclude_wins_over_include(sessions_tree):
    cfg = {"bids_dir": sessions_tree, "include_subjects": ["01", "02"], "exclude_subjects": ["02"]}
    assert discover_scans(cfg)["participant_id"].unique().tolist() == ["sub-01"]


def test_yaml_integer_labels_match_by_number(sessions_tree):
    # YAML reads `include_subjects: [01, 2]` as [1, 2]
    table = discover_scans({"bids_dir": sessions_tree, "include_subjects": [1, 2], "sessions": [1]})
    assert table["scan_id"].tolist() == ["sub-01_ses-1", "sub-02_ses-1"]


def test_include_subjects_from_file(sessions_tree, tmp_path):
    listing = touch(tmp_path / "keep.tsv", b"participant_id\tgroup\n# pilot\nsub-10\tA\n02\tB\n\n")
    table = discover_scans({"bids_dir": sessions_tree, "include_subjects": str(listing)})
    assert table["participant_id"].unique().tolist() == ["sub-02", "sub-10"]


def test_unknown_include_label_is_warned(sessions_tree, caplog):
    discover_scans({"bids_dir": sessions_tree, "include_subjects": ["01", "99"]})
    assert "sub-99" in caplog.text


def test_entity_filters(tmp_path):
    root = tmp_path / "bids"
    bids_file(root, "01", entities="_acq-mprage")
    bids_file(root, "01", entities="_acq-fast")
    bids_file(root, "02", entities="_acq-mprage_run-01")
    bids_file(root, "02", entities="_acq-mprage_run-02")
    table = discover_scans({"bids_dir": root, "filters": {"acq": "mprage", "run": [None, 2]}})
    assert table["scan_id"].tolist() == ["sub-01", "sub-02"]
    assert table["acq"].tolist() == ["mprage", "mprage"]
    assert table["run"].tolist() == ["", "02"]


def test_run_policies_and_scan_id_rule(tmp_path):
    root = tmp_path / "bids"
    for run in ("1", "2", "10"):
        bids_file(root, "01", "a", entities=f"_run-{run}")
    bids_file(root, "02", "a")
    bids_file(root, "02", "a", entities="_acq-fast")
    cfg = {"bids_dir": root}
    table = discover_scans({**cfg, "run_policy": "all"})
    assert table["scan_id"].tolist() == [
        "sub-01_ses-a_run-1",
        "sub-01_ses-a_run-2",
        "sub-01_ses-a_run-10",  # runs sort as numbers
        "sub-02_ses-a",
        "sub-02_ses-a_acq-fast",
    ]
    first = discover_scans({**cfg, "run_policy": "first"})
    assert first["scan_id"].tolist() == ["sub-01_ses-a", "sub-02_ses-a"]
    assert first["run"].tolist() == ["1", ""]
    last = discover_scans({**cfg, "run_policy": "last"})
    assert last["run"].tolist() == ["10", ""]
    assert last["acq"].tolist() == ["", "fast"]


def test_planned_files_are_listed_as_a_walk_of_them_would(tmp_path):
    # files a job will write (the demo cohort's rule): same rows as walking them once written
    planned = [
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.json",  # not a scan: left out
    ]
    cfg = {"bids_dir": str(tmp_path / "bids"), "run_policy": "all", "exclude_subjects": ["02"]}
    table = discover_scans(cfg, planned=planned)
    assert not (tmp_path / "bids").exists()
    for rel in planned:
        touch(tmp_path / "bids" / rel)
    assert table.equals(discover_scans(cfg))
    assert table["scan_id"].tolist() == ["sub-01_ses-1_run-1", "sub-01_ses-1_run-2"]
    with pytest.raises(ValueError, match="is not sub-"):
        discover_scans(cfg, planned=["sub-01/sub-01_T1w.nii.gz"])
    with pytest.raises(ValueError, match="not a valid scan name"):
        discover_scans(cfg, planned=["sub-01/anat/sub-02_T1w.nii.gz"])


def test_scan_ids_match_wildcard_constraint(tmp_path):
    root = tmp_path / "bids"
    bids_file(root, "01", "pre", entities="_acq-mp2rage_inv-1_part-mag")
    bids_file(root, "01", "pre", entities="_acq-mp2rage_inv-2_part-mag")
    bids_file(root, "ABC")
    table = discover_scans({"bids_dir": root, "run_policy": "all"})
    pattern = re.compile(scan_id_wildcard_constraint())
    assert pattern.groups == 0
    assert all(pattern.fullmatch(scan_id) for scan_id in table["scan_id"])
    assert not pattern.fullmatch("sub-01/../x")
    assert {"inv", "part"} <= set(table.columns)


def test_paths_with_spaces_non_ascii_and_symlinks(tmp_path):
    store = tmp_path / "stockage données" / "IRM"
    real = touch(store / "T1 brut é.nii.gz")
    root = tmp_path / "étude BIDS" / "my data"
    bids_file(root, "01")
    link = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    (root / "sub-03").symlink_to(root / "sub-01", target_is_directory=True)  # linked subject folder
    touch(root / "sub-03" / "anat" / "sub-03_T1w.nii")
    table = discover_scans({"bids_dir": str(root)})
    assert table["scan_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["path"][1] == str(link)  # the link, not its target
    assert "my data" in table["path"][0] and "étude" in table["path"][0]


def test_scans_tsv_relative_paths_and_entities(tmp_path):
    data = tmp_path / "my scans é"
    a = touch(data / "raw" / "subject one.nii.gz")
    b = touch(data / "raw" / "sub-02_ses-b_run-2_T1w.nii")
    c = touch(tmp_path / "elsewhere" / "c.nii")
    table_path = touch(
        data / "scans.tsv",
        (
            "participant_id\tpath\trun\n"
            "01\traw/subject one.nii.gz\tn/a\n"
            "sub-02\traw/sub-02_ses-b_run-2_T1w.nii\tn/a\n"
            f"sub-03\t{c}\t3\n"
        ).encode(),
    )
    table = discover_scans({"scans_tsv": str(table_path)})
    assert table["scan_id"].tolist() == ["sub-01", "sub-02_ses-b", "sub-03"]
    assert table["session_id"].tolist() == ["", "ses-b", ""]  # session from the BIDS-like name
    assert table["run"].tolist() == ["", "2", "3"]
    assert table["path"].tolist() == [str(a), str(b), str(c)]


def test_scans_tsv_with_session_column(tmp_path):
    touch(tmp_path / "a.nii")
    touch(tmp_path / "b.nii")
    listing = touch(
        tmp_path / "s.tsv", b"participant_id\tsession_id\tpath\n1\tpre\ta.nii\n1\tses-post\tb.nii\n"
    )
    table = discover_scans({"scans_tsv": listing, "bids_dir": None})
    assert table["scan_id"].tolist() == ["sub-1_ses-post", "sub-1_ses-pre"]


def test_participants_tsv_path(tmp_path, sessions_tree):
    assert participants_tsv_path({"bids_dir": sessions_tree}) is None
    touch(sessions_tree / "participants.tsv", b"participant_id\n")
    assert participants_tsv_path({"bids_dir": sessions_tree}) == sessions_tree / "participants.tsv"
    other = touch(tmp_path / "pheno.tsv", b"participant_id\n")
    assert participants_tsv_path({"bids_dir": sessions_tree, "participants_tsv": other}) == other


def test_defaults_and_normalisation():
    settings = resolve_inputs_config({"bids_dir": "/x", "extensions": ["nii", ".nii.gz"]})
    assert settings.extensions == (".nii.gz", ".nii")
    assert settings.suffix == "T1w" and settings.run_policy == "error"


# ----------------------------------------------------------------------------- errors


def test_error_bids_dir_missing(tmp_path):
    message = error_of({"bids_dir": str(tmp_path / "nope")})
    assert "bids_dir" in message and "does not exist" in message
    assert "--config bids_dir=" in message and str(tmp_path / "nope") in message


def test_error_bids_dir_is_a_file(tmp_path):
    message = error_of({"bids_dir": str(touch(tmp_path / "file.txt"))})
    assert "not a directory" in message and "file.txt" in message


def test_error_bids_dir_without_subjects(tmp_path):
    bids_file(tmp_path / "bids", "01")
    message = error_of({"bids_dir": str(tmp_path / "bids" / "sub-01")})
    assert "no sub-* folder" in message and "root" in message


def test_error_no_t1w(tmp_path):
    root = tmp_path / "bids"
    touch(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    message = error_of({"bids_dir": root})
    assert "no T1w scan" in message and "sub-*/[ses-*/]anat/sub-*_T1w" in message
    assert "inputs.suffix" in message


def test_error_filters_remove_everything(sessions_tree):
    message = error_of({"bids_dir": sessions_tree, "sessions": ["3"]})
    assert "none of the 6" in message and "sessions=[3]" in message and "inputs.sessions" in message


def test_error_both_and_neither_source(tmp_path):
    message = error_of({"bids_dir": str(tmp_path), "scans_tsv": str(tmp_path / "s.tsv")})
    assert "both bids_dir" in message and "scans_tsv" in message
    message = error_of({"bids_dir": None})
    assert "no input" in message and "bids_dir" in message and "scans_tsv" in message


def test_error_scans_tsv_missing_column(tmp_path):
    listing = touch(tmp_path / "s.tsv", b"subject\tpath\n01\ta.nii\n")
    message = error_of({"scans_tsv": listing})
    assert "lacks column(s) participant_id" in message and "s.tsv" in message


def test_error_scans_tsv_listed_file_missing(tmp_path):
    listing = touch(tmp_path / "s.tsv", b"participant_id\tpath\n01\tmissing one.nii\n")
    message = error_of({"scans_tsv": listing})
    assert "1 listed file(s) do not exist" in message and "missing one.nii" in message
    assert "line 2" in message


@pytest.mark.parametrize(
    "files, policy, words",
    [
        # two runs under run_policy: error: both named, and the key that decides
        (
            [{"entities": "_run-1"}, {"entities": "_run-2"}],
            "error",
            ["sub-01_run-1_T1w.nii.gz", "sub-01_run-2_T1w.nii.gz", "inputs.run_policy"],
        ),
        # the same scan as .nii and .nii.gz: no policy chooses between them
        ([{"ext": ".nii"}, {"ext": ".nii.gz"}], "all", ["inputs.extensions"]),
    ],
)
def test_error_duplicate_scan_ids(tmp_path, files, policy, words):
    root = tmp_path / "bids"
    for file in files:
        bids_file(root, "01", **file)
    message = error_of({"bids_dir": root, "run_policy": policy})
    assert "duplicate scan id 'sub-01'" in message
    assert all(word in message for word in words), message


def test_error_broken_symlink(tmp_path):
    root = tmp_path / "bids"
    bids_file(root, "01")
    link = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "annex" / "missing")
    message = error_of({"bids_dir": root})
    assert "broken symbolic link" in message and "sub-02_T1w.nii.gz" in message
    # excluding the subject makes the dataset usable
    assert discover_scans({"bids_dir": root, "exclude_subjects": ["02"]})["scan_id"].tolist() == [
        "sub-01"
    ]


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"run_policy": "newest"}, ["inputs.run_policy", "first"]),
        ({"include_subject": ["01"]}, ["inputs.include_subject", "allowed"]),
        ({"sessions": ["a/b"]}, ["inputs.sessions", "'a/b'"]),
        ({"filters": {"sub": ["01"]}}, ["inputs.filters", "include_subjects"]),
        ({"extensions": []}, ["inputs.extensions"]),
    ],
)
def test_error_bad_config(tmp_path, cfg, words):
    message = error_of({"bids_dir": str(tmp_path), **cfg})
    assert all(word in message for word in words), message


def test_error_message_escapes_newline_in_path(tmp_path):
    message = error_of({"bids_dir": str(tmp_path / "bad\nname")})
    assert "bad\\nname" in message
