"""Bad inputs: each kind is an ``excluded`` QC record with its precise reason, never a crash."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from nidl_dino.errors import ScanRejected
from nidl_dino.preprocessing import merge_config, output_paths, preprocess_scan
from nidl_dino.preprocessing.io import read_nifti
from nidl_dino.preprocessing.phantom import scanner_affine, synthetic_scan

# Registration and N4 off: these tests are about reading and validation.
FAST = {
    "registration": {"enabled": False},
    "bias_correction": {"enabled": False},
    "resample": {"spacing_mm": 4.0},
}


def _volume(shape=(40, 52, 44), spacing=4.0) -> tuple[np.ndarray, np.ndarray]:
    affine = scanner_affine(shape, (spacing,) * 3, "RAS")
    return synthetic_scan(shape, affine, head_spacing_mm=4.0, seed=1), affine


def _save(path, data, affine, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), path)
    return path


def _good(tmp_path, name="good.nii.gz"):
    data, affine = _volume()
    return _save(tmp_path / name, data, affine)


def truncated_gzip(tmp_path):
    raw = _good(tmp_path).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def corrupt_gzip(tmp_path):
    raw = bytearray(_good(tmp_path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the deflate stream
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(raw))
    return path


def truncated_nii(tmp_path):
    path = _good(tmp_path, "good.nii")
    raw = path.read_bytes()
    path.write_bytes(raw[: 352 + 1000])  # header + extension flag + 1000 bytes of voxels
    return path


def not_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"participant_id\tage\nsub-01\t34\n" * 50))
    return path


def png_named_nii(tmp_path):
    path = tmp_path / "picture.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1000))
    return path


def image_2d(tmp_path):
    return _save(tmp_path / "slice.nii.gz", np.random.default_rng(0).random((64, 64)), np.eye(4))


def image_4d(tmp_path):
    data, affine = _volume()
    return _save(tmp_path / "bold.nii.gz", np.stack([data] * 3, axis=-1), affine)


def with_nan(tmp_path):
    data, affine = _volume()
    data.flat[:120] = np.nan
    data.flat[-5:] = np.inf  # counted too
    return _save(tmp_path / "nan.nii.gz", data, affine)


def all_zero(tmp_path):
    data, affine = _volume()
    return _save(tmp_path / "zero.nii.gz", np.zeros_like(data), affine, dtype=np.int16)


def singular_affine(tmp_path):
    data, _ = _volume()
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 2] = affine[:3, 1]  # third axis along the second: zero volume
    return _save(tmp_path / "singular.nii.gz", data, affine)


def absurd_voxel(tmp_path):
    data, _ = _volume()
    return _save(tmp_path / "huge_voxels.nii.gz", data, np.diag([4.0, 25.0, 4.0, 1.0]))


def tiny_fov(tmp_path):
    data, affine = _volume()
    return _save(
        tmp_path / "slab.nii.gz", data[:, :, 18:22].repeat(5, axis=2), np.diag([4, 4, 0.5, 1])
    )


def missing(tmp_path):
    return tmp_path / "nowhere.nii.gz"


BAD_INPUTS = [
    (truncated_gzip, "truncated or corrupt gzip (Compressed file ended before the end-of-stream"),
    (corrupt_gzip, "truncated or corrupt gzip"),
    (truncated_nii, f"truncated file: 1000 of {40 * 52 * 44 * 4} bytes of voxel data present"),
    (not_nifti, "not a NIfTI file (no NIfTI-1/NIfTI-2 header)"),
    (png_named_nii, "not a NIfTI file (no NIfTI-1/NIfTI-2 header)"),
    (image_2d, "2D image (shape 64x64); expected a 3D volume"),
    (image_4d, "4D image with 3 volumes; expected one 3D volume"),
    (with_nan, "contains 125 NaN/inf voxels"),
    (all_zero, "constant image (all voxels 0)"),
    (singular_affine, "singular affine"),
    (absurd_voxel, "implausible voxel size 25.0 mm (allowed 0.2-10 mm)"),
    (tiny_fov, "field of view 10.0 mm along an axis is below 80 mm; expected a whole brain"),
    (missing, "file not found"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "reason"), BAD_INPUTS, ids=[m.__name__ for m, _ in BAD_INPUTS])
def test_bad_input_is_excluded_with_its_reason(tmp_path, make, reason):
    path = make(tmp_path)
    out = tmp_path / "out"
    ids = {"participant_id": "sub-01", "session_id": "ses-1"}
    record = preprocess_scan(path, out, "sub-01_ses-1", config=FAST, ids=ids)

    assert record["status"] == "excluded"
    assert record["reason"].startswith(reason)
    assert "\n" not in record["reason"]
    assert record["participant_id"] == "sub-01" and record["session_id"] == "ses-1"
    assert record["input_file"] == str(path)
    qc_json, qc_png = out / "sub-01_ses-1_desc-qc_T1w.json", out / "sub-01_ses-1_desc-qc_T1w.png"
    assert json.loads(qc_json.read_text()) == json.loads(json.dumps(record))
    assert qc_png.read_bytes()[:4] == b"\x89PNG"
    # no volume, mask nor transform: only the QC record and picture
    assert sorted(out.iterdir()) == [qc_json, qc_png]


def test_single_volume_4d_is_accepted(tmp_path):
    data, affine = _volume()
    path = _save(tmp_path / "one.nii.gz", data[..., None], affine)
    record = preprocess_scan(path, tmp_path / "out", "one", config=FAST)
    assert record["status"] == "ok", record["reason"]
    assert record["input"]["shape"] == [40, 52, 44, 1]


def test_rejected_scan_removes_stale_outputs(tmp_path):
    out = tmp_path / "out"
    assert preprocess_scan(_good(tmp_path), out, "s", config=FAST)["status"] == "ok"
    assert len(list(out.iterdir())) == 5  # volume, mask, transform, QC record and picture
    record = preprocess_scan(all_zero(tmp_path), out, "s", config=FAST)
    assert record["status"] == "excluded"
    assert sorted(p.name for p in out.iterdir()) == ["s_desc-qc_T1w.json", "s_desc-qc_T1w.png"]


def test_read_nifti_raises_scan_rejected_with_path(tmp_path):
    path = not_nifti(tmp_path)
    with pytest.raises(ScanRejected) as info:
        read_nifti(path)
    assert info.value.path == str(path)
    assert str(info.value) == f"{path}: not a NIfTI file (no NIfTI-1/NIfTI-2 header)"


def test_nifti2_is_read(tmp_path):
    data, affine = _volume()
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(data, affine), path)
    img = read_nifti(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_poor_registration_is_excluded(tmp_path):
    # Registration off and the head 60 mm away from its MNI position: the similarity to the
    # template is low, and the scan is excluded for it, not silently kept.
    data, affine = _volume()
    shifted = affine.copy()
    shifted[:3, 3] += [60.0, 0.0, 0.0]
    path = _save(tmp_path / "shifted.nii.gz", data, shifted)
    record = preprocess_scan(path, tmp_path / "out", "s", config=FAST)
    similarity = record["metrics"]["registration_similarity"]
    floor = merge_config()["qc"]["min_similarity"]
    assert similarity < floor
    assert record["status"] == "excluded"
    assert record["reason"].startswith(
        f"registration similarity {similarity:.2f} below threshold {floor:g}"
    )
    assert record["flags"][0] == record["reason"].split("; ")[0]
    assert not output_paths(tmp_path / "out", "s", FAST)["volume"].exists()


def test_brain_outside_the_field_of_view_is_excluded(tmp_path):
    data, affine = _volume()
    far = affine.copy()
    far[:3, 3] += [0.0, 0.0, 1000.0]  # registration off: the head is 1 m above MNI's brain
    path = _save(tmp_path / "far.nii.gz", data, far)
    record = preprocess_scan(path, tmp_path / "out", "s", config=FAST)
    assert record["status"] == "excluded"
    assert record["reason"] == "the brain mask lies entirely outside the field of view"
