"""Workflow jobs (nidl_dino.jobs): one-line errors, and a batch of scans preprocessed in one job
with each scan isolated in its own process."""

from __future__ import annotations

import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from nidl_dino import jobs
from nidl_dino.errors import UserError
from nidl_dino.preprocessing.phantom import scanner_affine, synthetic_scan

NO_REG = {"registration": {"enabled": False}, "resample": {"spacing_mm": 4.0}}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two valid heads, one all-zero volume, one that will crash its process."""
    folder = tmp_path_factory.mktemp("inputs")
    shape = (48, 56, 48)
    affine = scanner_affine(shape, (4.0, 4.0, 4.0), "RAS")
    affine[:3, 3] += [0.0, -17.0, 5.0]
    rows = []
    for i, kind in enumerate(["good", "good", "zero", "crash"]):
        data = synthetic_scan(shape, affine, head_spacing_mm=4.0, seed=i)
        if kind == "zero":
            data = np.zeros(shape, np.float32)
        path = folder / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        rows.append(
            {
                "scan_id": f"sub-{i:02d}",
                "path": str(path),
                "participant_id": f"sub-{i:02d}",
                "session_id": "",
            }
        )
    return rows


def test_job_turns_a_user_error_into_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        with jobs.job(str(tmp_path / "x.log"), "thing"):
            raise UserError("config key 'a.b' is wrong: fix it")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "nidl-dino: error in thing: config key 'a.b' is wrong: fix it"


def test_batch_isolates_each_scan_and_redoes_only_what_is_missing(tmp_path, scans, monkeypatch):
    real = jobs.preprocess_or_exclude

    def crashing(in_file, out_dir, prefix, **kwargs):
        if prefix == "sub-03":  # a library crash: the process dies, nothing is caught
            os.kill(os.getpid(), signal.SIGKILL)
        return real(in_file, out_dir, prefix, **kwargs)

    # the children are forked after this: they run the patched function
    monkeypatch.setattr(jobs, "preprocess_or_exclude", crashing)
    out = tmp_path / "preproc"
    result = jobs.preprocess_batch(scans, out, NO_REG, workers=2, log_dir=tmp_path / "logs")
    by_scan = {r["scan_id"]: r for r in result}
    assert [r["scan_id"] for r in result] == [s["scan_id"] for s in scans]
    assert by_scan["sub-00"]["status"] == by_scan["sub-01"]["status"] == "ok"
    assert by_scan["sub-02"]["status"] == "excluded" and by_scan["sub-02"]["reason"]
    assert by_scan["sub-03"]["status"] == "excluded"
    assert "killed by signal 9" in by_scan["sub-03"]["reason"]
    crashed = json.loads((out / "sub-03" / "sub-03_qc.json").read_text())
    assert crashed["status"] == "excluded" and crashed["scan_id"] == "sub-03"
    assert (tmp_path / "logs" / "sub-00.log").exists()
    for scan in ("sub-00", "sub-01"):
        assert (out / scan / f"{scan}_desc-preproc_T1w.nii.gz").exists()
    assert not any(r["skipped"] for r in result)

    # a re-run skips every finished scan and retries the crashed one (it left no signature)
    monkeypatch.setattr(jobs, "preprocess_or_exclude", real)
    volume = out / "sub-00" / "sub-00_desc-preproc_T1w.nii.gz"
    before = volume.stat().st_mtime_ns
    again = {r["scan_id"]: r for r in jobs.preprocess_batch(scans, out, NO_REG, workers=2)}
    assert again["sub-00"]["skipped"] and again["sub-01"]["skipped"] and again["sub-02"]["skipped"]
    assert not again["sub-03"]["skipped"] and again["sub-03"]["status"] == "ok"
    assert volume.stat().st_mtime_ns == before

    # another preprocessing configuration redoes every scan
    other = {**NO_REG, "normalization": {"method": "zscore"}}
    redone = jobs.preprocess_batch(scans[:1], out, other, workers=1)
    assert not redone[0]["skipped"]
    # and a changed input file too
    os.utime(scans[1]["path"], ns=(1, 1))
    assert not jobs.preprocess_batch(scans[1:2], out, NO_REG, workers=1)[0]["skipped"]
