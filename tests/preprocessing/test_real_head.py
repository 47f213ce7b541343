"""A real head through preprocessing: Colin27 ``ch2`` re-acquired in known ways.

The head and its companions come from Debian's mricron-data (``real_head`` fixture in
conftest.py; the tests skip with the reason where apt is unavailable). ``ch2`` is stored close to
MNI space; every acquisition below is the same head moved by a known world transform ``M``
(identity for re-storage), so the right registration of an acquisition is ``M @ T0``, with
``T0`` the one found for the untouched head. Checked per acquisition: status ok; the found
transform within 1 mm of ``M @ T0`` at the template brain's edge; the preprocessed volume
correlating with the untouched head's inside the brain.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nidl_dino.preprocessing import merge_config, output_paths, preprocess_scan
from nidl_dino.preprocessing.bias import n4_bias_field
from nidl_dino.preprocessing.io import read_nifti
from nidl_dino.preprocessing.mask import brain_mask_on_grid, foreground_mask
from nidl_dino.preprocessing.orientation import reorient_to_ras
from nidl_dino.preprocessing.pipeline import correct_and_register
from nidl_dino.preprocessing.qc import BRAIN_CENTRE_MM, local_optimum, qc_flags
from nidl_dino.preprocessing.resample import block_average, block_factors
from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_1mm
from nidl_dino.preprocessing.validate import validate_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Preprocessing as the demo config (3 mm output grid): the checks do not need 1.5 mm.
CONFIG = {"resample": {"spacing_mm": 3.0}}


def rotation(degrees) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for rotations (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(degrees, shift_mm, centre_mm=(0.0, -18.0, 10.0)) -> np.ndarray:
    """World rigid motion: rotate about ``centre_mm``, then shift."""
    m = np.eye(4)
    m[:3, :3] = rotation(degrees)
    c = np.asarray(centre_mm)
    m[:3, 3] = c - m[:3, :3] @ c + np.asarray(shift_mm)
    return m


def brain_edge_points() -> np.ndarray:
    """About 2,000 points (MNI mm) on the edge of the template brain mask, shape (N, 3)."""
    data, affine = template_1mm()
    brain = data > BRAIN_THRESHOLD
    edge = np.argwhere(brain & ~ndimage.binary_erosion(brain))[::40]
    return edge @ affine[:3, :3].T + affine[:3, 3]


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ transform[:3, :3].T + transform[:3, 3]


def save(path, data, affine, dtype=np.float32, slope=None, inter=None):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def acquire(kind: str, head: nib.Nifti1Image, brain: np.ndarray, folder):
    """Write acquisition ``kind`` of the head; return (path, M: head world -> new world)."""
    data = np.asarray(head.get_fdata(dtype=np.float32))
    affine = head.affine
    path = folder / f"{kind}.nii.gz"
    identity = np.eye(4)
    if kind == "moved":  # known rigid motion, resampled onto a padded grid (one interpolation)
        m = rigid((10.0, -7.0, 5.0), (6.0, -8.0, 5.0))
        pad = 20
        grid = affine.copy()
        grid[:3, 3] -= affine[:3, :3] @ [pad, pad, pad]
        shape = tuple(n + 2 * pad for n in data.shape)
        vox = np.linalg.inv(affine) @ np.linalg.inv(m) @ grid
        moved = ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], shape, order=1)
        return save(path, np.clip(moved, 0, None), grid), m
    if kind in ("LPS", "PIL"):
        ornt = nib.orientations.axcodes2ornt(tuple(kind))
        transform = nib.orientations.ornt_transform(nib.io_orientation(affine), ornt)
        img = head.as_reoriented(transform)
        assert nib.aff2axcodes(img.affine) == tuple(kind)
        return save(path, img.get_fdata(), img.affine, np.uint8), identity
    if kind == "aniso_1x1x3":
        thick, thick_affine = block_average(data, affine, [1, 1, 3])
        return save(path, thick, thick_affine), identity
    if kind == "int16_scaled":
        stored = np.round((data * 37.5 + 200.0 - 5.0) / 0.37)  # stored * 0.37 + 5 = value
        return save(path, stored, affine, np.int16, slope=0.37, inter=5.0), identity
    if kind == "bias_noise":
        ijk = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
        x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]) / 100.0
        log_field = (0.25 * x - 0.3 * y + 0.2 * z + 0.15 * x * y - 0.2 * z * z).reshape(data.shape)
        head_mask = data > 20
        lo, hi = log_field[head_mask].min(), log_field[head_mask].max()
        a, b = np.log(0.6), np.log(1.6)
        field = np.exp(a + (log_field - lo) * (b - a) / (hi - lo))
        rng = np.random.default_rng(0)
        sigma = 0.03 * np.percentile(data[brain], 90)  # 3 % of white matter
        real = data * field + sigma * rng.standard_normal(data.shape)
        noisy = np.hypot(real, sigma * rng.standard_normal(data.shape))
        return save(path, noisy, affine), identity
    if kind == "defaced":
        ijk = np.indices(data.shape).reshape(3, -1)
        _, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *data.shape)
        face = (y > 10) & (z < -10) & ~ndimage.binary_dilation(brain, iterations=5)
        assert face.sum() > 100_000  # the face, nose and jaw are gone
        return save(path, np.where(face, 0, data), affine, np.uint8), identity
    if kind == "cropped":  # tight field of view: neck, nose, back and top of the head cut off
        cropped = data[:, 5:205, 8:165]  # y -120..+79 mm, z -63..+93 mm (brain: -60..+78)
        shift = np.eye(4)
        shift[:3, 3] = [0, 5, 8]
        return save(path, cropped, affine @ shift, np.uint8), identity
    raise ValueError(kind)


@pytest.fixture(scope="module")
def untouched(real_head, tmp_path_factory):
    """The untouched head's record, transform and preprocessed volume (plus the inputs)."""
    folder = tmp_path_factory.mktemp("real_head")
    record = preprocess_scan(real_head["ch2.nii.gz"], folder / "out", "ch2", CONFIG)
    assert record["status"] == "ok", record["reason"]
    head = nib.load(real_head["ch2.nii.gz"])
    brain = np.asarray(nib.load(real_head["ch2bet.nii.gz"]).dataobj) > 0
    return {
        "folder": folder,
        "record": record,
        "transform": np.array(record["steps"]["registration"]["template_to_subject_ras"]),
        "volume": np.asarray(
            nib.load(output_paths(folder / "out", "ch2", CONFIG)["volume"]).dataobj
        ),
        "head": head,
        "brain": brain,
    }


#: Largest error (mm) at the brain edge accepted per acquisition: 1 mm, the issue's bar, for every
#: re-acquisition of the ch2 file. The skull-stripped copy and the 0.5 mm reconstruction are other
#: files of the head; with the shipped refinement at 4 mm they end 1.09 and 1.21 mm off (2026-12,
#: one ITK thread), within 1 mm with ``registration.refine_spacing_mm: 2`` (tested below).
MAX_EDGE_ERROR_MM = {"ch2better": 1.25, "ch2bet": 1.25}

#: The refinement at 2 mm (about 4 s more per scan).
FINE = {**CONFIG, "registration": {"refine_spacing_mm": 2.0}}


def test_skull_stripped_and_whole_head_give_close_volumes(untouched, real_head):
    folder = untouched["folder"] / "out"
    record = preprocess_scan(real_head["ch2bet.nii.gz"], folder, "ch2bet", CONFIG)
    assert record["steps"]["skull_stripped"]["detected"] is True
    assert untouched["record"]["steps"]["skull_stripped"]["detected"] is False
    # Measured 2026-12: r 0.955, mean |difference| 0.045 (N4 alone: 0.954, 0.050).
    check_against_untouched(record, folder, "ch2bet", untouched, np.eye(4), min_r=0.95)
    img = nib.load(output_paths(folder, "ch2bet", CONFIG)["volume"])
    stripped = np.asarray(img.dataobj)
    inside = brain_mask_on_grid(stripped.shape, img.affine)
    assert np.abs(stripped[inside] - untouched["volume"][inside]).mean() < 0.052


def check_against_untouched(record, folder, prefix, untouched, m, min_r=0.95, limit=None):
    assert record["status"] == "ok", record["reason"]
    found = np.array(record["steps"]["registration"]["template_to_subject_ras"])
    points = brain_edge_points()
    errors = np.linalg.norm(
        apply(found, points) - apply(m @ untouched["transform"], points), axis=1
    )
    limit = MAX_EDGE_ERROR_MM.get(prefix, 1.0) if limit is None else limit
    assert errors.max() < limit, f"{prefix}: max {errors.max():.2f} mm at the brain edge"
    img = nib.load(output_paths(folder, prefix, CONFIG)["volume"])
    volume = np.asarray(img.dataobj)
    ref = untouched["volume"]
    inside = brain_mask_on_grid(volume.shape, img.affine)
    r = np.corrcoef(volume[inside], ref[inside])[0, 1]
    assert r > min_r, f"{prefix}: correlation {r:.3f} with the untouched head"
    return errors.max(), r


FAST = ["moved", "PIL", "aniso_1x1x3", "int16_scaled", "bias_noise", "defaced", "cropped"]
SLOW = ["LPS"]  # same code path as PIL


@pytest.mark.parametrize("kind", FAST + [pytest.param(k, marks=pytest.mark.slow) for k in SLOW])
def test_real_head_acquisition_registers_and_matches(untouched, kind):
    folder = untouched["folder"]
    path, m = acquire(kind, untouched["head"], untouched["brain"], folder)
    record = preprocess_scan(path, folder / "out", kind, CONFIG)
    error, r = check_against_untouched(record, folder / "out", kind, untouched, m)
    (folder / f"{kind}_summary.json").write_text(json.dumps({"error_mm": error, "r": r}))


@pytest.fixture(scope="module")
def untouched_fine(untouched, real_head):
    """The untouched head preprocessed with the 2 mm refinement (its transform: the reference)."""
    folder = untouched["folder"] / "fine"
    record = preprocess_scan(real_head["ch2.nii.gz"], folder, "ch2", FINE)
    assert record["status"] == "ok" and record["steps"]["registration"]["refined"]
    transform = np.array(record["steps"]["registration"]["template_to_subject_ras"])
    volume = np.asarray(nib.load(output_paths(folder, "ch2", FINE)["volume"]).dataobj)
    return {**untouched, "folder": folder, "transform": transform, "volume": volume}


def test_skull_stripped_copy_within_1_mm_with_the_2_mm_refinement(untouched_fine, real_head):
    folder = untouched_fine["folder"]
    record = preprocess_scan(real_head["ch2bet.nii.gz"], folder, "ch2bet", FINE)
    # ch2bet is ch2's voxels inside its brain: the same positions (a direct rigid registration
    # of the two at 1 mm finds them 0.3 mm apart at the brain's edge)
    error, _ = check_against_untouched(
        record, folder, "ch2bet", untouched_fine, np.eye(4), limit=1.0
    )
    assert error < 1.0


def same_head_relation(fixed: str, moving: str) -> np.ndarray:
    """Where ``moving``'s points of the same head lie, from ``fixed``'s (RAS+ mm, affine):
    a direct registration of the two images at full resolution (same subject, same contrast)."""
    import ants

    from nidl_dino.preprocessing.ants_bridge import ants_transform_to_ras, to_ants_image

    images = []
    for path in (fixed, moving):
        img = nib.load(path)
        images.append(to_ants_image(np.asarray(img.get_fdata(dtype=np.float32)), img.affine))
    found = ants.registration(
        images[0],
        images[1],
        type_of_transform="Affine",
        aff_metric="GC",
        aff_iterations=(200, 100, 50),
        aff_shrink_factors=(4, 2, 1),
        aff_smoothing_sigmas=(2, 1, 0),
        random_seed=1,
    )
    return ants_transform_to_ras(ants.read_transform(found["fwdtransforms"][0]))


@pytest.mark.slow
def test_real_head_half_millimetre_volume(untouched, untouched_fine, real_head):
    # ch2better is another reconstruction of the head: 0.4-0.5 % larger than ch2 and 0.5 mm
    # shifted (0.8 mm at the brain's edge); that relation, measured directly, is the truth
    m = same_head_relation(real_head["ch2.nii.gz"], real_head["ch2better.nii.gz"])
    assert abs(np.linalg.det(m[:3, :3]) - 1.0) < 0.03
    folder = untouched["folder"] / "out"
    record = preprocess_scan(real_head["ch2better.nii.gz"], folder, "ch2better", CONFIG)
    check_against_untouched(record, folder, "ch2better", untouched, m, min_r=0.9)
    folder = untouched_fine["folder"]
    record = preprocess_scan(real_head["ch2better.nii.gz"], folder, "ch2better", FINE)
    check_against_untouched(record, folder, "ch2better", untouched_fine, m, min_r=0.9, limit=1.0)


def test_macaque_is_excluded_with_a_reason(real_head, tmp_path):
    record = preprocess_scan(real_head["inia19-t1-brain.nii.gz"], tmp_path, "macaque", CONFIG)
    assert record["status"] == "excluded"
    assert "field of view 64.0 mm" in record["reason"] and "whole brain" in record["reason"]
    # Let the small field of view through: the QC measures must still exclude it.
    relaxed = {**CONFIG, "validation": {"min_fov_mm": 40.0}}
    record = preprocess_scan(real_head["inia19-t1-brain.nii.gz"], tmp_path, "macaque2", relaxed)
    assert record["status"] == "excluded"
    assert "registration" in record["reason"], record["reason"]


def working_image(path):
    """The bias-corrected working image as ``preprocess_scan`` makes it (default config)."""
    cfg = merge_config(CONFIG)
    data, affine = reorient_to_ras(*validate_image(read_nifti(path), cfg["validation"], "ch2"))
    work, work_affine = block_average(
        data, affine, block_factors(affine, cfg["working_spacing_mm"])
    )
    work = work / n4_bias_field(work, work_affine, foreground_mask(work), cfg["bias_correction"])
    return work, work_affine, cfg


def perturbation(degrees=(0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0), scale=1.0) -> np.ndarray:
    """Template-space rotation and scaling about the brain centre, then a shift."""
    p = rigid(degrees, shift_mm, BRAIN_CENTRE_MM)
    centre = np.asarray(BRAIN_CENTRE_MM)
    p[:3, :3] *= scale
    p[:3, 3] = centre - p[:3, :3] @ centre + np.asarray(shift_mm)
    return p


def test_qc_keeps_the_found_registration_and_flags_perturbed_ones(untouched, real_head):
    metrics = untouched["record"]["metrics"]
    assert metrics["registration_optimum"]["gain"] < 0.005, metrics["registration_optimum"]
    work, work_affine, cfg = working_image(real_head["ch2.nii.gz"])
    found = untouched["transform"]
    working = float(cfg["working_spacing_mm"])
    good = local_optimum(work, work_affine, found, working)
    assert qc_flags(with_optimum(good), cfg["qc"]) == []
    # 7 degrees about an oblique axis, 7 mm in an oblique direction, 12 % larger or smaller.
    axis = np.array([1.0, -2.0, 1.5]) / np.linalg.norm([1.0, -2.0, 1.5])
    wrong = {
        "7 deg": perturbation(degrees=7.0 * axis),
        "7 mm": perturbation(shift_mm=7.0 * axis),
        "+12 %": perturbation(scale=1.12),
        "-12 %": perturbation(scale=0.88),
    }
    for name, p in wrong.items():
        optimum = local_optimum(work, work_affine, found @ p, working)
        flags = qc_flags(with_optimum(optimum), cfg["qc"])
        assert flags, f"{name}: not flagged ({optimum})"
        assert "registration" in flags[0]


def with_optimum(optimum: dict) -> dict:
    """QC metrics with only the registration measures of interest (the rest passing)."""
    return {
        "registration_similarity": optimum["similarity"],
        "registration_optimum": optimum,
        "outside_fov_fraction": 0.0,
        "intensity": {"p99_over_p50": 2.0},
    }


def log_spread(field: np.ndarray) -> float:
    """``p95 - p5`` of the logarithm of a positive field: 0.05 is 5 % variation."""
    p5, p95 = np.percentile(np.log(field), [5, 95])
    return float(p95 - p5)


def strong_field(head: nib.Nifti1Image) -> np.ndarray:
    """A smooth x0.6-1.6 field over the head (``exp`` of a fixed quadratic in world dm)."""
    data = np.asarray(head.get_fdata(dtype=np.float32))
    ijk = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
    x, y, z = (head.affine[:3, :3] @ ijk + head.affine[:3, 3:4]) / 100.0
    log_field = (0.25 * x - 0.3 * y + 0.2 * z + 0.15 * x * y - 0.2 * z * z).reshape(data.shape)
    inside = data > 20
    lo, hi = log_field[inside].min(), log_field[inside].max()
    a, b = np.log(0.6), np.log(1.6)
    return np.exp(a + (log_field - lo) * (b - a) / (hi - lo)).astype(np.float32)


def final_field(work: np.ndarray, affine: np.ndarray, config: dict) -> np.ndarray:
    """The field preprocess_scan divides by (its ``correct_and_register``)."""
    return correct_and_register(work, affine, foreground_mask(work), config).field


@pytest.fixture(scope="module")
def strong_field_spreads(real_head):
    """Spreads (``p95 - p5`` of the log inside ch2bet's brain) under a strong field on ch2.

    At working resolution, as the benchmark (benchmarks/bias_correction.py): ``before``, the
    applied field; per setting (``n4``: N4 alone; ``default``: N4, then the template fit), the
    field left: the biased head's estimated field against the untouched head's (the biased head
    after correction over the untouched head after the same correction).
    """
    head = nib.load(real_head["ch2.nii.gz"])
    data = np.asarray(head.get_fdata(dtype=np.float32))
    field = strong_field(head)
    brain = np.asarray(nib.load(real_head["ch2bet.nii.gz"]).dataobj) > 0
    factors = block_factors(head.affine, merge_config()["working_spacing_mm"])
    clean, affine = block_average(data, head.affine, factors)
    biased, _ = block_average(data * field, head.affine, factors)
    true, _ = block_average(field, head.affine, factors)
    inside = block_average(brain.astype(np.float32), head.affine, factors)[0] > 0.5
    spreads = {"before": log_spread(true[inside])}
    settings = {"n4": {"bias_correction": {"template_fit": {"enabled": False}}}, "default": {}}
    for name, change in settings.items():
        config = merge_config(change)
        estimated = final_field(biased, affine, config)[inside]
        untouched = final_field(clean, affine, config)[inside]
        spreads[name] = log_spread(true[inside] * untouched / estimated)
    return spreads


def test_a_strong_bias_field_is_removed_to_under_5_percent(strong_field_spreads):
    """The issue's bar: under 5 % of a strong field left inside the brain."""
    spreads = strong_field_spreads
    assert spreads["before"] > 0.3, spreads  # a strong field inside the brain
    # N4 alone: partly removed (2026-12: about 40 % left, benchmarks/bias_correction.py)
    assert spreads["n4"] < 0.75 * spreads["before"], spreads
    assert spreads["default"] < 0.05, spreads
