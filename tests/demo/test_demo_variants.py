"""Tests of the demo generator's knobs (nidl_dino.demo.variant): each knob against a formula written
here, the presets, the command line and the config route; the default variant is today's demo."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy
import yaml
from scipy import ndimage as ndi

from nidl_dino.demo import DEFAULT_SITES, make_demo_dataset, recorded_variant, scanner
from nidl_dino.demo import anatomy as anat
from nidl_dino.demo.__main__ import main
from nidl_dino.demo.variant import (
    BRAIN_ONLY_SITES,
    DEFAULT_VARIANT,
    PRESETS,
    CohortVariant,
    get_variant,
)
from nidl_dino.errors import UserError
from nidl_dino.workflow.setup import demo_plan

from workflow_helpers import REPO

COARSE_SITES = tuple(dataclasses.replace(s, voxel_size_mm=(3.0, 3.0, 3.0)) for s in DEFAULT_SITES)
# No pose, unit gain: native voxels line up with the template's world axes.
STILL = scanner.Acquisition((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, (0.0,) * 9)
# A float32 site whose storage grid (step 0.5) is fine next to its white-matter value.
PROBE_SITE = scanner.SiteProtocol("probe", (4.0, 4.0, 4.0), "RAS", "float32", 1024.0, 0.0, 0.0, 0)

# sha256 of a 2-subject cohort (seed 7, one bad scan, default sites) written by the generator
# before it had variants (commit 286d8a4), with these library versions; gzip output depends on
# zlib and the volumes on numpy/scipy, so other versions skip the comparison.
PINNED_VERSIONS = {"numpy": "2.4.6", "scipy": "1.15.3", "nibabel": "5.4.2", "zlib": "1.2.13"}
PINNED_SHA256 = {
    ".bidsignore": "50a6d9d20505b86844f9adb9261e3e2661d1898118bc89dfd92385f62d528795",
    "demo_manifest.tsv": "a649608874c415c005715c51170f4829dbb2c08369ffd911b543ad5f1a84798a",
    "participants.json": "c07f063523fed9611d56a40ee1e0a07fd78f751ce1e11bb24268610e3960e57e",
    "participants.tsv": "814d2ee363fe42bdc53bd56c5667b2ce6542cab6bcee696ad2240cdae23e3b72",
    "sub-001/anat/sub-001_T1w.nii.gz": (
        "17bd114505346cb04b933ced3b5d54a2aea0b9eb636e9b0666000a31fa69d116"
    ),
    "sub-002/anat/sub-002_T1w.nii.gz": (
        "ca474d830feec01aa10fd16768e3b9246d8f2dcd000f7fc6cdb4fa99642dde00"
    ),
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(
        root / "demo_manifest.tsv", sep="\t", dtype={"session_id": str}, keep_default_na=False
    )


def _person(sex: str = "F", seed: int = 0, **latents) -> anat.Anatomy:
    return dataclasses.replace(anat.draw_anatomy(np.random.default_rng(seed), sex), **latents)


# ---------------------------------------------------------------- the default is today's demo


def test_default_variant_writes_the_bytes_of_the_demo_before_variants(tmp_path):
    versions = {
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "nibabel": nib.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
    }
    if versions != PINNED_VERSIONS:
        pytest.skip(f"pinned bytes were written with {PINNED_VERSIONS}, here {versions}")
    make_demo_dataset(tmp_path / "b", n_subjects=2, seed=7, n_bad=1)
    files = _files(tmp_path / "b")
    assert sorted(files) == sorted([*PINNED_SHA256, "dataset_description.json"])
    for name, digest in PINNED_SHA256.items():
        assert hashlib.sha256(files[name]).hexdigest() == digest, name


def test_default_variant_by_name_value_or_absence_writes_the_same_bytes(tmp_path):
    spelled_out = CohortVariant(
        name="default",
        skull=True,
        bias_scale=1.0,
        noise_scale=1.0,
        sites=DEFAULT_SITES,
        ventricle_gain=anat.VENT_LOG_GAIN,
        thinning_gain=anat.THIN_GAIN,
        gm_intensity_gain=anat.GM_INTENSITY_AGE_GAIN,
        wm_intensity_gain=0.0,
        lesion_count=0.0,
    )
    assert spelled_out == DEFAULT_VARIANT == get_variant(None) == get_variant("default")
    kwargs = dict(n_subjects=2, seed=2, n_bad=1, sessions=True)
    make_demo_dataset(tmp_path / "none", **kwargs)
    make_demo_dataset(tmp_path / "name", variant="default", **kwargs)
    make_demo_dataset(tmp_path / "value", variant=spelled_out, **kwargs)
    reference = _files(tmp_path / "none")
    assert "demo_variant.json" not in reference
    assert _files(tmp_path / "name") == reference
    assert _files(tmp_path / "value") == reference
    assert recorded_variant(tmp_path / "none") == "default"


# ---------------------------------------------------------------- skull, bias, noise, contrast


def _posed_mni(img: nib.Nifti1Image, row, step: int) -> np.ndarray:
    """MNI point (mm) that every ``step``-th voxel of ``img`` shows (documented pose and scale)."""
    centre = anat.load_template().head_center
    ax, ay, az = np.deg2rad([row.rotation_x_deg, row.rotation_y_deg, row.rotation_z_deg])
    c, s = np.cos, np.sin
    rx = np.array([[1, 0, 0], [0, c(ax), -s(ax)], [0, s(ax), c(ax)]])
    ry = np.array([[c(ay), 0, s(ay)], [0, 1, 0], [-s(ay), 0, c(ay)]])
    rz = np.array([[c(az), -s(az), 0], [s(az), c(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    scale = np.array([row.head_scale_x, row.head_scale_y, row.head_scale_z])
    shift = np.array([row.shift_x_mm, row.shift_y_mm, row.shift_z_mm])
    ijk = np.indices([len(range(0, n, step)) for n in img.shape]).reshape(3, -1).T * step
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return centre + ((world - centre - shift) @ rot) / scale


@pytest.fixture(scope="module")
def brain_only(tmp_path_factory) -> Path:
    """The brain_only preset as shipped: one subject per site (about 1 mm voxels)."""
    out = tmp_path_factory.mktemp("brain_only") / "bids"
    make_demo_dataset(out, n_subjects=3, seed=0, n_bad=0, variant="brain_only")
    return out


def test_no_skull_is_zero_outside_the_brain(brain_only):
    tpl = anat.load_template()
    brain = tpl.brain > 0.5
    # Signed distance to the template brain's edge (mm): > 0 outside, < 0 inside.
    edge = ndi.distance_transform_edt(~brain, sampling=2.0) - ndi.distance_transform_edt(
        brain, sampling=2.0
    )
    inverse = np.linalg.inv(tpl.affine)
    for row in _manifest(brain_only).itertuples():
        img = nib.load(brain_only / row.path)
        data = np.asarray(img.dataobj)[::2, ::2, ::2]
        vox = (_posed_mni(img, row, 2) @ inverse[:3, :3].T + inverse[:3, 3]).T
        depth = ndi.map_coordinates(edge, vox, order=1, cval=100.0).reshape(data.shape)
        # The non-linear warp moves the edge by a few mm: margins of 10 mm either side.
        assert np.all(data[depth > 10.0] == 0), row.path
        assert np.all(data[depth < -10.0] > 0), row.path
        assert (data == 0).mean() > 0.5  # most of the field of view is outside the brain


def test_brain_only_preset_writes_its_sites(brain_only):
    site_of = {s.name: s for s in BRAIN_ONLY_SITES}
    manifest = _manifest(brain_only)
    assert set(manifest["site"]) == set(site_of)
    for row in manifest.itertuples():
        img = nib.load(brain_only / row.path)
        site = site_of[row.site]
        assert "".join(nib.aff2axcodes(img.affine)) == site.axcodes
        assert img.get_data_dtype() == np.dtype(site.dtype)
        assert np.allclose(img.header.get_zooms(), site.voxel_size_mm)
    recorded = json.loads((brain_only / "demo_variant.json").read_text())
    assert recorded["name"] == "brain_only" and recorded["skull"] is False
    assert (brain_only / ".bidsignore").read_text().split() == [
        "demo_manifest.tsv",
        "demo_variant.json",
    ]
    assert "variant='brain_only'" in (brain_only / "dataset_description.json").read_text()
    assert recorded_variant(brain_only) == "brain_only"


def test_skull_on_keeps_the_scalp(tmp_path):
    make_demo_dataset(tmp_path, n_subjects=1, seed=4, n_bad=0, sites=COARSE_SITES)
    row = next(_manifest(tmp_path).itertuples())
    img = nib.load(tmp_path / row.path)
    tpl = anat.load_template()
    inverse = np.linalg.inv(tpl.affine)
    vox = (_posed_mni(img, row, 1) @ inverse[:3, :3].T + inverse[:3, 3]).T
    depth = ndi.map_coordinates(tpl.head_depth, vox, order=1, cval=100.0).reshape(img.shape)
    shell = np.asarray(img.dataobj)[(depth > 5.0) & (depth < 16.0)]
    wm = {s.name: s for s in COARSE_SITES}[row.site].white_matter_value
    assert np.percentile(shell, 90) > 0.5 * wm  # the scalp: 0.8-0.9 of white matter


def _central(shape) -> tuple[slice, ...]:
    return tuple(slice(n // 3, 2 * n // 3) for n in shape)


def _bias_by_hand(shape: tuple[int, int, int], coef: tuple[float, ...]) -> np.ndarray:
    """The documented field, exp(sum c_k q_k), on the central third of the array grid."""
    box = _central(shape)
    out = np.empty([b.stop - b.start for b in box])
    for i, j, k in np.ndindex(*out.shape):
        index = (i + box[0].start, j + box[1].start, k + box[2].start)
        x, y, z = (2.0 * v / (n - 1) - 1.0 for v, n in zip(index, shape, strict=True))
        terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
        out[i, j, k] = np.exp(sum(c * t for c, t in zip(coef, terms, strict=True)))
    return out


def _constant_scan(site, acq, variant, value: float = 1.0, seed: int = 0) -> np.ndarray:
    """A scan of a uniform template image, central third of the field of view (all inside it)."""
    image = np.full(anat.load_template().brain.shape, value, np.float32)
    person = _person()
    img = scanner.acquire(site, person, acq, image, np.random.default_rng(seed), variant)
    data = np.asarray(img.dataobj, dtype=np.float64)
    return data[_central(data.shape)]


def test_bias_scale_zero_is_a_flat_field_and_one_the_sites():
    site = PROBE_SITE
    biased_site = dataclasses.replace(site, bias=0.2)
    off = CohortVariant(bias_scale=0.0)
    flat = scanner.draw_acquisition(np.random.default_rng(3), biased_site, off)
    assert flat.bias_coef == (0.0,) * 9
    assert np.all(scanner.bias_field((5, 6, 7), flat.bias_coef) == 1.0)
    # The same draws whatever the scale: only the field changes.
    a = scanner.draw_acquisition(np.random.default_rng(3), biased_site, DEFAULT_VARIANT)
    b = scanner.draw_acquisition(
        np.random.default_rng(3), biased_site, CohortVariant(bias_scale=2.5)
    )
    assert a.rotation_deg == b.rotation_deg == flat.rotation_deg and a.gain == b.gain
    assert np.allclose(np.array(b.bias_coef), 2.5 * np.array(a.bias_coef))

    quiet = CohortVariant(noise_scale=0.0)
    still = dataclasses.replace(STILL, gain=1.25)
    flat_scan = _constant_scan(site, still, quiet)
    assert np.all(flat_scan == 1024.0 * 1.25)  # gain x white matter, nothing else
    coef = (0.1, -0.2, 0.05, 0.1, 0.0, -0.1, 0.05, 0.0, 0.02)
    biased = _constant_scan(site, dataclasses.replace(still, bias_coef=coef), quiet)
    shape, _ = site.grid()
    expected = 1024.0 * 1.25 * _bias_by_hand(shape, coef)
    assert np.allclose(biased, expected, atol=0.5)  # the storage grid's step


def test_noise_scale_multiplies_the_sites_sigma():
    site = dataclasses.replace(PROBE_SITE, noise=0.04)
    for k in (0.0, 1.0, 2.5):
        data = _constant_scan(site, STILL, CohortVariant(noise_scale=k)) / 1024.0
        # Rician at SNR >= 10: standard deviation close to sigma, mean close to sqrt(1 + sigma^2).
        sigma = 0.04 * k
        assert data.std() == pytest.approx(sigma, rel=0.1, abs=1e-3)
        assert data.mean() == pytest.approx(np.sqrt(1 + sigma**2), abs=0.01)


def test_site_contrast_is_an_exponent_of_the_signal():
    for contrast in (1.0, 0.8, 1.3):
        site = dataclasses.replace(PROBE_SITE, contrast=contrast)
        data = _constant_scan(site, STILL, CohortVariant(noise_scale=0.0), value=0.5)
        assert np.allclose(data, 1024.0 * 0.5**contrast, atol=0.5)
    with pytest.raises(ValueError, match="contrast"):
        dataclasses.replace(PROBE_SITE, contrast=0.0)


# ---------------------------------------------------------------- age effects


def test_ventricle_gain_sets_the_growth_of_the_ventricles():
    person = _person()
    for gain in (0.0, 0.6, 1.2):
        variant = CohortVariant(ventricle_gain=gain)
        young = anat.tissue_maps(person, 20.0, variant).vent_ml
        for age in (50.0, 80.0):
            a = (age - 20.0) / 60.0
            ratio = anat.tissue_maps(person, age, variant).vent_ml / young
            assert ratio == pytest.approx(np.exp(gain * a**2), rel=0.03), (gain, age)
    none = CohortVariant(ventricle_gain=0.0, thinning_gain=0.0)
    assert np.array_equal(
        anat.tissue_maps(person, 20.0, none).gm, anat.tissue_maps(person, 80.0, none).gm
    )


def test_thinning_gain_sets_the_grey_matter_loss():
    person = _person(z_thin=0.0)  # theta = gain * a
    for gain in (0.0, 0.1, 0.15):
        variant = CohortVariant(ventricle_gain=0.0, thinning_gain=gain)
        young = anat.tissue_maps(person, 20.0, variant)
        for age in (50.0, 80.0):
            a = (age - 20.0) / 60.0
            old = anat.tissue_maps(person, age, variant)
            assert 1 - old.gm_ml / young.gm_ml == pytest.approx(gain * a, abs=0.01)
            # The lost grey matter becomes CSF; white matter and ventricles are untouched.
            assert old.csf_ml - young.csf_ml == pytest.approx(young.gm_ml - old.gm_ml, rel=1e-4)
            assert old.wm_ml == pytest.approx(young.wm_ml, rel=1e-6)


def _tissue_values(maps: anat.TissueMaps, image: np.ndarray) -> np.ndarray:
    """Least-squares intensities of (wm, gm, csf[, lesion]) from the image inside the brain."""
    brain = anat.load_template().brain > 0.5
    columns = [maps.wm, maps.gm, maps.csf] + ([maps.lesion] if maps.lesion is not None else [])
    design = np.stack([c[brain] for c in columns], axis=1).astype(np.float64)
    values, *_ = np.linalg.lstsq(design, image[brain].astype(np.float64), rcond=None)
    return values


@pytest.mark.parametrize("gm_gain,wm_gain", [(0.06, 0.0), (0.0, 0.0), (0.02, 0.06)])
def test_intensity_gains_measured_on_the_image(gm_gain, wm_gain):
    person = _person(z_contrast=0.5, z_csf=-1.0)
    variant = CohortVariant(gm_intensity_gain=gm_gain, wm_intensity_gain=wm_gain)
    for age in (20.0, 50.0, 80.0):
        a = (age - 20.0) / 60.0
        maps = anat.tissue_maps(person, age, variant)
        wm, gm, csf = _tissue_values(maps, anat.template_intensity(person, maps, age, variant))
        assert gm == pytest.approx(0.66 + gm_gain * a + 0.025 * 0.5, abs=1e-4)
        assert wm == pytest.approx(1.0 - wm_gain * a, abs=1e-4)
        assert csf == pytest.approx(0.25 - 0.02, abs=1e-4)


def test_gm_contrast_off_leaves_the_morphology_alone():
    person = _person()
    weak = PRESETS["weak_gm_contrast"]
    for age in (30.0, 70.0):
        default = anat.tissue_maps(person, age, DEFAULT_VARIANT)
        other = anat.tissue_maps(person, age, weak)
        assert np.array_equal(default.gm, other.gm) and default.vent_ml == other.vent_ml
    assert anat.gm_intensity(person, 80.0, weak) == anat.gm_intensity(person, 20.0, weak)


# ---------------------------------------------------------------- lesions


def test_lesion_count_rises_with_age_as_lesion_count_a_squared():
    variant = CohortVariant(lesion_count=20.0)
    people = [anat.draw_lesions(np.random.default_rng(i), variant) for i in range(400)]
    for a in (0.25, 0.5, 1.0):
        counts = [sum(lesion.onset <= a for lesion in lesions) for lesions in people]
        # Poisson mean 20 a^2 times a mean-one log-normal load (sd of the mean about 4 %)
        assert np.mean(counts) == pytest.approx(20.0 * a**2, rel=0.15, abs=0.3), a
    assert anat.draw_lesions(np.random.default_rng(0), CohortVariant(lesion_count=0.0)) == ()


def test_lesions_grow_in_white_matter_and_show_their_intensity():
    variant = CohortVariant(lesion_count=30.0, lesion_intensity=0.45)
    lesions = anat.draw_lesions(np.random.default_rng(5), variant)
    person = _person(lesions=lesions)
    plain_person = _person()
    counts, volumes = [], []
    for age in (20.0, 40.0, 60.0, 80.0):
        maps = anat.tissue_maps(person, age, variant)
        counts.append(maps.lesion_count)
        volumes.append(maps.lesion_ml)
        a = (age - 20.0) / 60.0
        assert maps.lesion_count == sum(lesion.onset <= a for lesion in lesions)
        if maps.lesion is not None:
            # lesions replace white matter only, and only the white matter
            plain = anat.tissue_maps(plain_person, age, variant)
            assert np.allclose(maps.wm + maps.lesion, plain.wm, atol=1e-6)
            assert np.array_equal(maps.gm, plain.gm) and np.array_equal(maps.csf, plain.csf)
    assert counts[0] == 0 and all(np.diff(counts) >= 0) and counts[-1] > 0
    assert volumes[0] == 0 and all(np.diff(volumes) >= 0) and volumes[-1] > volumes[-2] > 0
    # a lesion's radius grows by half its onset radius every 15 years
    first = lesions[0]
    assert first.radius_at(first.onset + 0.25) == pytest.approx(1.5 * first.radius_mm)
    maps = anat.tissue_maps(person, 80.0, variant)
    values = _tissue_values(maps, anat.template_intensity(person, maps, 80.0, variant))
    assert values[3] == pytest.approx(0.45, abs=1e-4)


def test_lesions_change_nothing_else(tmp_path):
    kwargs = dict(n_subjects=2, seed=6, n_bad=0, sites=COARSE_SITES)
    make_demo_dataset(tmp_path / "plain", **kwargs)
    make_demo_dataset(tmp_path / "lesions", variant=CohortVariant(lesion_count=30.0), **kwargs)
    plain, lesioned = _manifest(tmp_path / "plain"), _manifest(tmp_path / "lesions")
    assert "lesion_ml" not in plain.columns
    same = [c for c in plain.columns if c != "wm_ml"]  # lesions take their volume from WM
    pd.testing.assert_frame_equal(plain[same], lesioned[same])
    assert np.allclose(lesioned["wm_ml"] + lesioned["lesion_ml"], plain["wm_ml"], atol=1e-3)
    older = lesioned.sort_values("age")
    assert older["lesion_count"].iloc[-1] >= older["lesion_count"].iloc[0]


# ---------------------------------------------------------------- presets, command line, config


def test_presets():
    assert {"default", "brain_only", "strong_bias", "lesions", "weak_gm_contrast"} <= set(PRESETS)
    assert all(v.name == name for name, v in PRESETS.items())
    assert PRESETS["brain_only"].skull is False
    assert PRESETS["strong_bias"].bias_scale > 1 and PRESETS["strong_bias"].noise_scale > 1
    assert PRESETS["lesions"].lesion_count > 0
    assert PRESETS["weak_gm_contrast"].gm_intensity_gain == 0
    with pytest.raises(ValueError, match="brain_only"):
        get_variant("no_such_variant")
    with pytest.raises(ValueError, match="bias_scale"):
        CohortVariant(bias_scale=-1.0)


def test_cli_variant_and_knob_flags(tmp_path, capsys):
    args = [str(tmp_path / "cli"), "--n-subjects", "1", "--n-bad", "0", "--variant", "lesions"]
    assert main([*args, "--lesion-count", "5", "--no-skull", "--bias-scale", "0"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("wrote 1 subjects, 1 scans (0 bad)") and "variant lesions+" in out
    recorded = json.loads((tmp_path / "cli/demo_variant.json").read_text())
    assert recorded["lesion_count"] == 5.0 and recorded["skull"] is False
    assert recorded["bias_scale"] == 0.0
    assert recorded["wm_intensity_gain"] == PRESETS["lesions"].wm_intensity_gain
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x"), "--variant", "nope"])
    assert exit_info.value.code == 2


def test_config_route(tmp_path, monkeypatch):
    schema = yaml.safe_load((REPO / "nidl_dino/config.schema.yaml").read_text())
    variant = schema["properties"]["demo"]["properties"]["variant"]
    assert variant["enum"] == list(PRESETS) and variant["default"] == "default"
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    assert shipped["demo"]["variant"] == "default"

    monkeypatch.chdir(tmp_path)
    demo = {"enabled": True, "bids_dir": "bids", "n_subjects": 2, "n_bad": 0, "seed": 1}
    config = {"bids_dir": "bids", "demo": {**demo, "variant": "weak_gm_contrast"}}
    plan = demo_plan(config)
    assert plan is not None and not (tmp_path / "bids").exists()  # planned, not written
    assert plan.arguments["variant"] == "weak_gm_contrast"
    make_demo_dataset(plan.bids_dir, **plan.arguments)
    assert recorded_variant(tmp_path / "bids") == "weak_gm_contrast"
    # the plan named every scan the generator wrote, and the dataset files the rule declares
    written = sorted(
        p.relative_to(tmp_path / "bids").as_posix()
        for p in (tmp_path / "bids").rglob("*_T1w.nii.gz")
    )
    assert sorted(plan.scans) == written
    assert all(Path(path).is_file() for path in plan.outputs)
    assert demo_plan(config) is None  # already there
    with pytest.raises(UserError, match="demo.variant is 'lesions'"):
        demo_plan({"bids_dir": "bids", "demo": {**demo, "variant": "lesions"}})
    assert demo_plan({"bids_dir": "elsewhere", "demo": demo}) is None  # not the demo's folder
