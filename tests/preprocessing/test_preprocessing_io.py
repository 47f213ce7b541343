"""Atomic writers of the preprocessing outputs: file modes follow the user's umask."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from nidl_dino.atomic import atomic_path
from nidl_dino.preprocessing.io import save_nifti_atomic, write_json_atomic


@pytest.fixture
def umask():
    """Set a umask for the test body and restore the caller's afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_writers_honour_umask(tmp_path, umask, mask):
    umask(mask)
    expected = 0o666 & ~mask  # what open(..., "w") gives an ordinary new file
    json_path = tmp_path / "record.json"
    write_json_atomic({"a": 1}, json_path)
    nii_path = tmp_path / "vol.nii.gz"
    save_nifti_atomic(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), nii_path)
    with atomic_path(tmp_path / "x.mat") as tmp:
        tmp.write_text("x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path in (json_path, nii_path, tmp_path / "x.mat", plain):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name
    # No temporary file is left next to the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["record.json", "vol.nii.gz", "x.mat", "plain.txt"]
    )
