"""Tests of the synthetic demo cohort (nidl_dino.demo): layout, determinism, effects, bad scans."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from nidl_dino.demo import BAD_KINDS, DEFAULT_SITES, make_demo_dataset
from nidl_dino.demo import anatomy as anat
from nidl_dino.demo.__main__ import main
from nidl_dino.demo.variant import DEFAULT_VARIANT
from nidl_dino.errors import UserError

# Coarse copies of the default protocols: same orientations, datatypes and scales, 4x fewer voxels.
COARSE_SITES = tuple(dataclasses.replace(s, voxel_size_mm=(3.0, 3.0, 3.0)) for s in DEFAULT_SITES)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(
        root / "demo_manifest.tsv", sep="\t", dtype={"session_id": str}, keep_default_na=False
    )


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Three subjects with the default site protocols; two of them bad (truncated, empty)."""
    out = tmp_path_factory.mktemp("demo") / "bids"
    return out, make_demo_dataset(out, n_subjects=3, seed=0, n_bad=2)


@pytest.fixture(scope="module")
def coarse_cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Ten good subjects at 3 mm, for the age and sex effects."""
    out = tmp_path_factory.mktemp("cohort") / "bids"
    return out, make_demo_dataset(out, n_subjects=10, seed=1, n_bad=0, sites=COARSE_SITES)


def test_same_seed_same_bytes(default_demo, tmp_path):
    root, table = default_demo
    again = make_demo_dataset(tmp_path / "again", n_subjects=3, seed=0, n_bad=2)
    pd.testing.assert_frame_equal(table, again)
    first, second = _files(root), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)


def test_workers_same_bytes(default_demo, tmp_path):
    """Subjects written by two worker processes are byte for byte the serial ones."""
    root, table = default_demo
    again = make_demo_dataset(tmp_path / "par", n_subjects=3, seed=0, n_bad=2, workers=2)
    pd.testing.assert_frame_equal(table, again)
    first, second = _files(root), _files(tmp_path / "par")
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)
    with pytest.raises(ValueError, match="workers"):
        make_demo_dataset(tmp_path / "zero", n_subjects=2, workers=0)


def test_other_seed_other_data(tmp_path):
    kwargs = dict(n_subjects=2, n_bad=0, sites=COARSE_SITES)
    make_demo_dataset(tmp_path / "s1", seed=1, **kwargs)
    make_demo_dataset(tmp_path / "s2", seed=2, **kwargs)
    scan = "sub-001/anat/sub-001_T1w.nii.gz"
    assert (tmp_path / "s1" / scan).read_bytes() != (tmp_path / "s2" / scan).read_bytes()
    assert (tmp_path / "s1/participants.tsv").read_text() != (
        tmp_path / "s2/participants.tsv"
    ).read_text()


def test_bids_layout_and_tables(default_demo):
    root, table = default_demo
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["GeneratedBy"][0]["Name"] == "nidl_dino.demo"
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "site"]
    assert list(participants["participant_id"]) == ["sub-001", "sub-002", "sub-003"]
    assert set(participants["sex"]) <= {"M", "F"}
    assert participants["age"].between(20, 80).all()
    assert set(participants["site"]) <= {s.name for s in DEFAULT_SITES}
    assert set(json.loads((root / "participants.json").read_text())) == set(participants.columns)
    pd.testing.assert_frame_equal(participants, table.drop(columns="bad_scan"))
    scans = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.nii.gz"))
    assert scans == [f"sub-00{i}/anat/sub-00{i}_T1w.nii.gz" for i in (1, 2, 3)]
    assert not list(root.rglob("*sessions.tsv"))
    assert (root / ".bidsignore").read_text().split() == ["demo_manifest.tsv"]


def test_sessions_layout(tmp_path):
    table = make_demo_dataset(
        tmp_path,
        n_subjects=2,
        seed=3,
        sessions=True,
        n_bad=1,
        sites=COARSE_SITES,
        bad_kinds=("empty",),
    )
    for pid, age in zip(table["participant_id"], table["age"], strict=True):
        for ses in ("ses-01", "ses-02"):
            assert (tmp_path / pid / ses / "anat" / f"{pid}_{ses}_T1w.nii.gz").is_file()
        sessions = pd.read_csv(tmp_path / pid / f"{pid}_sessions.tsv", sep="\t")
        assert list(sessions["session_id"]) == ["ses-01", "ses-02"]
        assert sessions["age"].iloc[0] == age
        assert 1.0 <= sessions["age"].iloc[1] - age <= 3.0 + 0.1
    manifest = _manifest(tmp_path)
    bad = manifest[manifest["bad_scan"] != ""]
    assert list(bad["session_id"]) == ["ses-02"] and list(bad["bad_scan"]) == ["empty"]


def test_site_protocols_in_headers(default_demo):
    root, table = default_demo
    manifest = _manifest(root)
    site_of = {s.name: s for s in DEFAULT_SITES}
    for row in manifest.itertuples():
        if row.bad_scan == "truncated":
            continue
        img = nib.load(root / row.path)
        site = site_of[row.site]
        assert "".join(nib.aff2axcodes(img.affine)) == site.axcodes
        assert img.get_data_dtype() == np.dtype(site.dtype)
        assert np.allclose(img.header.get_zooms(), site.voxel_size_mm)
        assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert {s.axcodes for s in DEFAULT_SITES} == {"RAS", "LAS", "PIL"}


def test_good_scans_look_like_heads(default_demo):
    root, _ = default_demo
    manifest = _manifest(root)
    row = manifest[manifest["bad_scan"] == ""].iloc[0]
    data = nib.load(root / row["path"]).get_fdata()
    assert np.isfinite(data).all()
    # Head in the middle of the field of view, dark air at its corners.
    centre = data[tuple(slice(n // 3, 2 * n // 3) for n in data.shape)]
    corner = data[tuple(slice(0, n // 8) for n in data.shape)]
    assert np.median(centre) > 5 * np.median(corner)
    assert np.corrcoef(data[1:].ravel(), data[:-1].ravel())[0, 1] > 0.8


def test_bad_scans_are_invalid(default_demo, tmp_path):
    root, table = default_demo
    assert sorted(table["bad_scan"]) == ["", "empty", "truncated"]
    paths = {
        kind: root / f"{pid}/anat/{pid}_T1w.nii.gz"
        for pid, kind in zip(table["participant_id"], table["bad_scan"], strict=True)
    }
    with pytest.raises(Exception):  # noqa: B017 - the gzip/zlib error type depends on the reader
        nib.load(paths["truncated"]).get_fdata()
    assert not nib.load(paths["empty"]).get_fdata().any()

    more = make_demo_dataset(tmp_path, n_subjects=4, seed=0, n_bad=4, sites=COARSE_SITES)
    assert sorted(more["bad_scan"]) == sorted(BAD_KINDS)
    kind_of = dict(zip(more["bad_scan"], more["participant_id"], strict=True))
    nan = nib.load(tmp_path / f"{kind_of['nan']}/anat/{kind_of['nan']}_T1w.nii.gz").get_fdata()
    assert np.isnan(nan).all()
    noise = nib.load(tmp_path / f"{kind_of['noise']}/anat/{kind_of['noise']}_T1w.nii.gz")
    data = noise.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    # Independent noise, no anatomy: neighbouring voxels are uncorrelated.
    assert abs(np.corrcoef(data[1:].ravel(), data[:-1].ravel())[0, 1]) < 0.05


def test_age_effect_in_ground_truth_maps():
    rng = np.random.default_rng(0)
    person = anat.draw_anatomy(rng, "F")
    maps = [anat.tissue_maps(person, age, DEFAULT_VARIANT) for age in (20, 40, 60, 80)]
    vent = [m.vent_ml for m in maps]
    gm = [m.gm_ml for m in maps]
    assert all(np.diff(vent) > 0) and all(np.diff(gm) < 0)
    # Atrophy inside a fixed skull: tissue fractions still sum to the brain mask.
    total = maps[-1].gm + maps[-1].wm + maps[-1].csf
    assert np.allclose(total, anat.load_template().brain, atol=1e-5)
    assert 2.0 < vent[-1] / vent[0] < 5.0
    assert 0.05 < 1 - gm[-1] / gm[0] < 0.3


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    c, s = np.cos, np.sin
    rx = np.array([[1, 0, 0], [0, c(ax), -s(ax)], [0, s(ax), c(ax)]])
    ry = np.array([[c(ay), 0, s(ay)], [0, 1, 0], [-s(ay), 0, c(ay)]])
    rz = np.array([[c(az), -s(az), 0], [s(az), c(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_age_effect_in_images(coarse_cohort):
    """Ventricles, sampled back through the documented pose, get darker with age."""
    root, _ = coarse_cohort
    manifest = _manifest(root)
    tpl = anat.load_template()
    centre = np.array([0.0, -17.0, 5.0])
    regions = {"vent": np.argwhere(tpl.vent_sdf < 3.0), "wm": np.argwhere(tpl.wm > 0.95)}
    darkness = []
    for row in manifest.itertuples():
        img = nib.load(root / row.path)
        rot = _rotation(row.rotation_x_deg, row.rotation_y_deg, row.rotation_z_deg)
        scale = np.diag([row.head_scale_x, row.head_scale_y, row.head_scale_z])
        shift = np.array([row.shift_x_mm, row.shift_y_mm, row.shift_z_mm])
        means = {}
        for name, idx in regions.items():
            mni = idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
            world = (mni - centre) @ scale.T @ rot.T + centre + shift
            vox = np.linalg.solve(img.affine[:3, :3], (world - img.affine[:3, 3]).T)
            means[name] = np.median(ndi.map_coordinates(img.get_fdata(), vox, order=1))
        darkness.append(1 - means["vent"] / means["wm"])
    assert np.corrcoef(manifest["age"], darkness)[0, 1] > 0.5
    assert np.corrcoef(manifest["age"], manifest["ventricles_ml"] / manifest["icv_ml"])[0, 1] > 0.5


def test_sex_effect_on_head_size(coarse_cohort):
    rng = np.random.default_rng(0)
    volume = {
        sex: np.array([np.prod(anat.draw_anatomy(rng, sex).head_scale) for _ in range(300)])
        for sex in ("M", "F")
    }
    ratio = volume["M"].mean() / volume["F"].mean()
    assert 1.07 < ratio < 1.15
    # Realistic overlap: a good share of women have larger heads than the median man.
    assert 0.05 < np.mean(volume["F"] > np.median(volume["M"])) < 0.35

    # In the written images, the head's volume follows the ground-truth intracranial volume.
    root, _ = coarse_cohort
    manifest = _manifest(root)
    head = []
    for path in manifest["path"]:
        img = nib.load(root / path)
        data = img.get_fdata()
        mask = ndi.binary_closing(data > 0.3 * np.percentile(data, 99), iterations=2)
        head.append(ndi.binary_fill_holes(mask).sum() * np.prod(img.header.get_zooms()))
    assert np.corrcoef(head, manifest["icv_ml"])[0, 1] > 0.7


def test_out_dir_rules(tmp_path):
    kwargs = dict(n_subjects=1, n_bad=0, sites=COARSE_SITES)
    make_demo_dataset(tmp_path / "demo", **kwargs)
    make_demo_dataset(tmp_path / "demo", seed=5, **kwargs)  # an earlier demo is replaced
    assert "seed=5" in (tmp_path / "demo/dataset_description.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no partial tree left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a nidl-dino demo"):
        make_demo_dataset(other, **kwargs)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="n_bad"):
        make_demo_dataset(tmp_path / "x", n_subjects=2, n_bad=3)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--n-subjects", "1", "--n-bad", "0", "--seed", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wrote 1 subjects, 1 scans (0 bad)")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "user")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a nidl-dino demo" in err[0]


def test_one_subject_alone_is_the_same_bytes_as_in_its_cohort(default_demo, tmp_path):
    from nidl_dino.demo import make_demo_subject

    out, _ = default_demo
    manifest = pd.read_csv(out / "demo_manifest.tsv", sep="\t", keep_default_na=False)
    for participant in ("sub-001", "sub-003"):  # a good scan and a bad one
        row = make_demo_subject(tmp_path, participant, n_subjects=3, seed=0, n_bad=2)
        assert row["path"] == manifest.set_index("participant_id").loc[participant, "path"]
        assert (tmp_path / row["path"]).read_bytes() == (out / row["path"]).read_bytes()
    with pytest.raises(ValueError, match="sub-009"):
        make_demo_subject(tmp_path, "sub-009", n_subjects=3, seed=0)
