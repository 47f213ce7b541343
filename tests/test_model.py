"""A trained model as an artifact: the teacher check, train_on, the model card, BIDS derivatives."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from nidl_dino.encoders.networks import build_encoder
from nidl_dino.errors import UserError
from nidl_dino.features.teacher import save_teacher
from nidl_dino.model import (
    CARD_FORMAT,
    card_markdown,
    check_preprocessing,
    expected_preprocessing,
    load_card,
    main,
    model_card,
    read_teacher,
    select_training_scans,
    training_card,
)
from nidl_dino.workflow.derivatives import BIDSIGNORE, dataset_description, write_derivatives_files

PREPROCESSING = {
    "resample": {"spacing_mm": 4.0, "fov_mm": [192.0, 192.0, 192.0]},
    "normalization": {"method": "percentile"},
}
CONFIG = {
    "seed": 0,
    "encoder": {"name": "small_cnn", "kwargs": {"channels": [4, 8]}},
    "views": {"global_size": [16, 16, 16]},
    "dino": {"proj_output_dim": 64},
    "trainer": {"max_epochs": 1},
    "data": {"batch_size": 2},
    "preprocessing": PREPROCESSING,
    "model": {"train_on": {"group": ["control"]}},
}


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.fixture
def teacher(tmp_path) -> Path:
    encoder = build_encoder(CONFIG["encoder"])
    card = training_card(
        CONFIG,
        ["sub-01", "sub-02", "sub-03"],
        {"epochs": 1, "global_step": 2, "final_loss": 3.5},
        {"train/loss_epoch": 3.5, "train/teacher_entropy": 2.0},
    )
    path = tmp_path / "run" / "model" / "teacher.pt"
    save_teacher(encoder, CONFIG["encoder"], path, extra={"card": card})
    return path


def test_teacher_records_the_preprocessing_it_expects(teacher):
    info = read_teacher(teacher)
    recorded = info["extra"]["card"]["preprocessing"]
    assert recorded["resample.spacing_mm"] == 4.0
    assert recorded["template"] == "MNI152NLin2009aSym"
    assert info["model_id"].endswith(info["weights_sha256"][:12])
    # the same preprocessing passes; ints and floats of one grid are the same
    same = {"resample": {"spacing_mm": 4, "fov_mm": [192, 192, 192]}}
    assert check_preprocessing(recorded, same, teacher) == []


def test_a_mismatched_grid_is_refused_naming_both_values(teacher):
    recorded = read_teacher(teacher)["extra"]["card"]["preprocessing"]
    with pytest.raises(UserError) as err:
        check_preprocessing(recorded, {"resample": {"spacing_mm": 3.0}}, teacher)
    line = one_line(err)
    assert "preprocessing.resample.spacing_mm" in line and "4.0" in line and "3.0" in line
    with pytest.raises(UserError) as err:
        check_preprocessing(
            recorded, {**PREPROCESSING, "normalization": {"method": "zscore"}}, teacher
        )
    assert "normalization.method" in one_line(err) and '"zscore"' in one_line(err)


def test_an_old_teacher_without_a_record_is_accepted_with_a_warning(tmp_path):
    path = tmp_path / "teacher.pt"
    save_teacher(build_encoder(CONFIG["encoder"]), CONFIG["encoder"], path)
    expected = (read_teacher(path)["extra"].get("card") or {}).get("preprocessing")
    warnings = check_preprocessing(expected, PREPROCESSING, path)
    assert len(warnings) == 1 and "re-train" in warnings[0]
    assert "saved before model cards" in model_card(path)["note"]


def test_damaged_or_foreign_files_are_refused_in_one_line(teacher, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher.read_bytes()[:2000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    tampered = tmp_path / "tampered.pt"
    payload = torch.load(teacher, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0
    torch.save(payload, tampered)
    for path, words in (
        (garbage, "damaged or not a nidl-dino teacher"),
        (truncated, "damaged or not a nidl-dino teacher"),
        (foreign, "not a nidl-dino teacher file"),
        (tampered, "is damaged: its weights do not match"),
        (tmp_path / "missing.pt", "does not exist"),
    ):
        with pytest.raises(UserError) as err:
            read_teacher(path)
        line = one_line(err)
        assert words in line and str(path) in line and "model.teacher" in line


def test_train_on_labels_and_participants_filters():
    scans = pd.DataFrame(
        {
            "scan_id": ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03", "sub-04"],
            "participant_id": ["sub-01", "sub-01", "sub-02", "sub-03", "sub-04"],
        }
    )
    participants = pd.DataFrame(
        {
            "participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
            "group": ["control", "patient", "control", "control"],
            "site": ["A", "A", "B", "C"],
            "visit": [1.0, 1.0, 2.0, None],
        }
    )
    assert select_training_scans(scans, None) == list(scans["scan_id"])
    assert select_training_scans(scans, ["01", "sub-03"]) == [
        "sub-01_ses-1",
        "sub-01_ses-2",
        "sub-03",
    ]
    chosen = select_training_scans(
        scans, {"group": ["control"], "site": ["A", "B"]}, participants, "p.tsv"
    )
    assert chosen == ["sub-01_ses-1", "sub-01_ses-2", "sub-03"]
    # a single value and numbers written as YAML ints match the table's floats
    assert select_training_scans(scans, {"visit": 2}, participants, "p.tsv") == ["sub-03"]
    with pytest.raises(UserError) as err:
        select_training_scans(scans, {"group": ["nobody"]}, participants, "p.tsv")
    assert "model.train_on selects no scan" in one_line(err)
    with pytest.raises(UserError) as err:
        select_training_scans(scans, {"diagnosis": ["x"]}, participants, "p.tsv")
    assert "no column 'diagnosis'" in one_line(err) and "group" in one_line(err)
    with pytest.raises(UserError) as err:
        select_training_scans(scans, ["sub-99"])
    assert "selects no scan" in one_line(err)


def test_model_card_fields_markdown_and_show(teacher, capsys):
    scores = pd.DataFrame(
        {
            "feature_set": ["dino", "chance"],
            "target": ["age", "age"],
            "metric": ["mae", "mae"],
            "mean": [7.5, 11.0],
            "std": [0.5, 1.0],
        }
    )
    card = model_card(teacher, probe_scores=scores)
    assert card["format"] == CARD_FORMAT
    assert card["n_training_scans"] == 3
    ids = "\n".join(sorted(["sub-01", "sub-02", "sub-03"]))
    assert card["training_scans_sha256"] == hashlib.sha256(ids.encode()).hexdigest()
    assert card["file_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert len(card["weights_sha256"]) == 64
    assert card["model_id"].endswith(card["weights_sha256"][:12])
    for section in ("encoder", "views", "dino", "trainer"):
        assert card["configuration"][section] == CONFIG[section]
    assert card["preprocessing"] == expected_preprocessing(PREPROCESSING)
    assert card["train_on"] == {"group": ["control"]}
    assert card["software"]["torch"] == torch.__version__.split("+")[0] or card["software"]["torch"]
    assert card["training"]["final_loss"] == 3.5
    assert card["training"]["monitors"]["train/teacher_entropy"] == 2.0
    assert card["probe_scores"] == [
        {"target": "age", "metric": "mae", "mean": 7.5, "std": 0.5}
    ]  # DINO's rows only
    text = card_markdown(card)
    assert card["model_id"] in text and "| age | mae | 7.5 | 0.5 |" in text

    # show: a teacher without a card beside it, then the card JSON beside it
    assert main(["show", str(teacher)]) == 0
    assert card["model_id"] in capsys.readouterr().out
    (teacher.parent / "model_card.json").write_text(json.dumps(card))
    assert load_card(teacher)["probe_scores"] == card["probe_scores"]
    assert main(["show", "--json", str(teacher.parent / "model_card.json")]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == card["model_id"]
    assert main(["show", str(teacher.parent / "nothing.pt")]) == 2


# BIDS 1.10 schema, src/schema/rules/dataset_metadata.yaml: dataset_description requires Name and
# BIDSVersion; derivative_description (DatasetType == "derivative") requires GeneratedBy;
# objects/metadata.yaml: DatasetType is "raw" or "derivative", GeneratedBy is an array of objects
# with a required Name (Version, Description, CodeURL, Container optional), SourceDatasets an
# array of objects with DOI, URL, Version.
def check_bids_derivative_description(description: dict) -> None:
    for field in ("Name", "BIDSVersion"):
        assert isinstance(description.get(field), str) and description[field], field
    assert description.get("DatasetType") in ("raw", "derivative")
    assert description["DatasetType"] == "derivative"
    generated = description.get("GeneratedBy")
    assert isinstance(generated, list) and generated
    for item in generated:
        assert isinstance(item.get("Name"), str) and item["Name"]
        for key in ("Version", "Description", "CodeURL"):
            assert key not in item or isinstance(item[key], str)
    sources = description.get("SourceDatasets", [])
    assert isinstance(sources, list)
    for item in sources:
        assert set(item) <= {"DOI", "URL", "Version"} and item
        assert all(isinstance(v, str) for v in item.values())


def test_dataset_description_is_a_bids_derivatives_description(tmp_path):
    from nidl_dino.workflow.derivatives import generated_by

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.1/abc"})
    )
    repo = Path(__file__).resolve().parents[1]
    generated = generated_by(repo)
    assert generated["Name"] == "nidl-dino" and generated["Version"]
    description = dataset_description(bids, generated)
    check_bids_derivative_description(description)
    assert description["SourceDatasets"] == [
        {"URL": bids.resolve().as_uri(), "DOI": "doi:10.1/abc"}
    ]
    write_derivatives_files(tmp_path / "out", description)
    assert json.loads((tmp_path / "out/dataset_description.json").read_text()) == description
    ignored = (tmp_path / "out/.bidsignore").read_text().split()
    assert ignored == list(BIDSIGNORE) and "features/" in ignored
