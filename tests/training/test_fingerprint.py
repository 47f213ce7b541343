"""The resume fingerprint sees what the training volumes were made from, not where they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nidl_dino.training.run import training_fingerprint, volume_keys
from nidl_dino.workflow.layout import ScanFiles

CONFIG = {"data": {"batch_size": 2}, "trainer": {"max_epochs": 3}}


def _scan(folder: Path, source: str, config_sha: str = "aaaa", record: str = "ok") -> Path:
    files = ScanFiles(folder, source)
    folder.mkdir(parents=True, exist_ok=True)
    files.volume.write_bytes(b"volume of " + source.encode())
    signature = {
        "input": {
            "input_file": f"/data/bids/{source}/anat/{source}_T1w.nii.gz",
            "size": 1234,
            "mtime_ns": 5678,
            "config_sha256": config_sha,
        },
        "record": {"scan_id": source, "status": record},
    }
    files.signature.write_text(json.dumps(signature))
    return files.volume


def test_a_new_preprocessing_configuration_changes_the_fingerprint(tmp_path):
    paths = [_scan(tmp_path / "a", "sub-01"), _scan(tmp_path / "a", "sub-02")]
    before = training_fingerprint(CONFIG, paths)
    _scan(tmp_path / "a", "sub-02", config_sha="bbbb")  # sub-02 preprocessed again, other settings
    assert training_fingerprint(CONFIG, paths) != before


def test_the_qc_record_and_the_order_do_not_change_it(tmp_path):
    paths = [_scan(tmp_path / "a", "sub-01"), _scan(tmp_path / "a", "sub-02")]
    before = training_fingerprint(CONFIG, paths)
    _scan(tmp_path / "a", "sub-01", record="ok, re-read")
    assert training_fingerprint(CONFIG, paths[::-1]) == before


def test_moving_the_output_folder_keeps_it(tmp_path):
    paths = [_scan(tmp_path / "a" / "sub-01" / "anat", "sub-01")]
    before = training_fingerprint(CONFIG, paths)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # new modification times of the copies
    moved = [tmp_path / "moved" / "sub-01" / "anat" / paths[0].name]
    assert training_fingerprint(CONFIG, moved) == before


def test_a_volume_without_signature_is_keyed_on_its_file(tmp_path):
    volume = ScanFiles(tmp_path, "sub-01").volume
    volume.write_bytes(b"x")
    os.utime(volume, ns=(1, 1_000_000_000))
    before = volume_keys([volume])
    os.utime(volume, ns=(1, 2_000_000_000))  # rewritten
    assert volume_keys([volume]) != before
    missing = volume_keys([tmp_path / "nowhere.nii.gz"])
    assert json.loads(missing[0]) == ["nowhere.nii.gz", None]
