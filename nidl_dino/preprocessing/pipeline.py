"""The preprocessing entry point: one scan in, a volume in MNI space and its QC record out.

Steps, each a function of its own module and each switchable in the config:

1. read and validate (io, validate): one finite, non-constant 3D volume with a usable affine;
2. reorient to RAS+ (orientation): exact, no interpolation;
3. block-average to the working resolution (resample), where the bias field (bias: N4, then a
   refit against the registered template's tissues) and the affine registration to MNI152
   (registration) are found (:func:`correct_and_register`);
4. one interpolation of the native volume onto the fixed MNI grid (resample), divided by the
   bias field interpolated the same way;
5. brain mask from the template, dilated (mask); intensity normalisation inside it (normalize);
6. QC measures and flags (qc); a flagged scan is excluded with its reason.

Any problem with the input becomes an ``excluded`` record with a one-line reason; only
programming errors raise.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nidl_dino.atomic import atomic_path
from nidl_dino.errors import ScanRejected
from nidl_dino.preprocessing.ants_bridge import write_ras_transform
from nidl_dino.preprocessing.bias import n4_bias_field, template_bias_field
from nidl_dino.preprocessing.config import merge_config
from nidl_dino.preprocessing.io import read_nifti, save_nifti_atomic, write_json_atomic
from nidl_dino.preprocessing.mask import brain_mask_on_grid, foreground_mask
from nidl_dino.preprocessing.normalize import normalize_intensity
from nidl_dino.preprocessing.orientation import axis_codes, reorient_to_ras
from nidl_dino.preprocessing.qc import (
    foreground_flag,
    intensity_stats,
    local_optimum,
    qc_flags,
    save_qc_png,
    save_text_png,
    similarity_to_template,
)
from nidl_dino.preprocessing.registration import (
    etiv_ml,
    register_to_template,
    scaling_determinant,
)
from nidl_dino.preprocessing.resample import (
    block_average,
    block_factors,
    inside_fov,
    output_grid,
    resample_to_grid,
)
from nidl_dino.preprocessing.validate import describe_input, validate_image
from nidl_dino.workflow.layout import ScanFiles

TEMPLATE_NAME = "MNI152 ICBM 2009 T1, skull-stripped (nilearn.datasets.load_mni152_template)"


def output_paths(
    out_dir: str | os.PathLike, prefix: str, config: dict[str, Any] | None = None
) -> dict[str, Path]:
    """The files of a scan in ``out_dir``, named by :class:`nidl_dino.workflow.layout.ScanFiles` after
    ``prefix`` and the grid of ``config``: ``volume``, ``mask``, ``transform``, ``qc_json``,
    ``qc_png``."""
    files = ScanFiles(Path(out_dir), prefix, merge_config(config)["resample"]["spacing_mm"])
    return {
        key: getattr(files, key) for key in ("volume", "mask", "transform", "qc_json", "qc_png")
    }


class _Processed:
    """What the steps produce for the writers: the volume, its grid and the transform."""

    def __init__(self, volume: np.ndarray, grid_affine: np.ndarray, transform: np.ndarray):
        self.volume = volume
        self.grid_affine = grid_affine
        self.transform = transform


def preprocess_scan(
    in_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    prefix: str,
    config: dict[str, Any] | None = None,
    ids: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Preprocess one T1w scan into MNI space and write its outputs and QC record.

    Files written in ``out_dir`` (each atomically: temporary name, then rename), named by
    :class:`nidl_dino.workflow.layout.ScanFiles` (``<space>`` the template, ``<r>`` the grid spacing):

    - ``<prefix>_space-<space>_res-<r>_desc-preproc_T1w.nii.gz``: float32 volume on the fixed
      MNI grid (sform and qform code MNI), normalised, masked unless ``mask.keep_head``;
    - ``<prefix>_space-<space>_res-<r>_desc-brain_mask.nii.gz``: the brain mask on the same grid
      (uint8, 1 inside): the template's brain dilated by ``mask.dilation_mm``, which the
      volume is masked with (unless ``mask.enabled`` is off or ``mask.keep_head`` on);
    - ``<prefix>_from-T1w_to-<space>_mode-image_xfm.mat``: the affine as an ITK/ANTs file. ITK
      convention: it maps MNI points to T1w points, i.e. it is the transform that resamples the
      T1w image onto MNI (``ants.apply_transforms(fixed=mni, moving=t1w, transformlist=[xfm])``);
      a T1w point goes to MNI with its inverse. Identity when registration is off.
    - ``<prefix>_desc-qc_T1w.png``: three orthogonal slices with the template outline;
    - ``<prefix>_desc-qc_T1w.json``: the QC record, written last.

    An excluded scan gets only the QC JSON and PNG (any volume, mask or transform left by an
    earlier run is removed).

    Args:
        in_file: the NIfTI file (``.nii`` or ``.nii.gz``).
        out_dir: output folder, created if needed.
        prefix: file name prefix, the input's entities, e.g. ``sub-01_ses-1_run-2``.
        config: the ``preprocessing:`` config section, possibly partial; merged over
            :data:`~nidl_dino.preprocessing.DEFAULT_CONFIG`.
        ids: identifiers copied into the record (e.g. ``participant_id``, ``session_id``).

    Returns:
        The QC record (as written to the JSON): ids, ``input_file``, ``status`` (``"ok"`` or
        ``"excluded"``), ``reason`` (``""`` when ok), ``flags``, ``input``, ``metrics``,
        ``steps``, ``outputs``, ``timings_s``, ``software``.

    Raises:
        UserError: an invalid ``config`` (unknown key or value), not a property of the scan.
    """
    cfg = merge_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, prefix, cfg)
    record: dict[str, Any] = {
        **(ids or {}),
        "input_file": str(in_file),
        "status": "ok",
        "reason": "",
        "flags": [],
        "input": {},
        "metrics": {},
        "steps": {},
        "outputs": {},
        "timings_s": {},
        "software": _software_versions(),
    }
    start = time.perf_counter()
    processed = None
    try:
        processed = _process(Path(in_file), cfg, record)
        flags = qc_flags(record["metrics"], cfg["qc"])
        if flags:
            record["flags"] = flags
            raise ScanRejected("; ".join(flags), str(in_file))
    except ScanRejected as rejected:
        record["status"] = "excluded"
        record["reason"] = rejected.reason
        if not record["flags"]:
            record["flags"] = [rejected.reason]

    tick = time.perf_counter()
    if record["status"] == "ok":
        _write_volume(processed, paths["volume"])
        _write_mask(processed, float(cfg["mask"]["dilation_mm"]), paths["mask"])
        with atomic_path(paths["transform"]) as tmp:
            write_ras_transform(processed.transform, tmp)
        record["outputs"] = {
            "volume": paths["volume"].name,
            "mask": paths["mask"].name,
            "transform": paths["transform"].name,
            "qc_png": paths["qc_png"].name,
        }
    else:
        for key in ("volume", "mask", "transform"):
            paths[key].unlink(missing_ok=True)
        record["outputs"] = {"qc_png": paths["qc_png"].name}
    title = f"{prefix}: {record['status']}"
    if processed is not None:
        save_qc_png(
            paths["qc_png"], processed.volume, processed.grid_affine, title, record["reason"]
        )
    else:
        save_text_png(paths["qc_png"], f"{prefix}: excluded", record["reason"])
    record["timings_s"]["write"] = round(time.perf_counter() - tick, 3)
    record["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    write_json_atomic(record, paths["qc_json"])
    return record


def _process(in_file: Path, cfg: dict[str, Any], record: dict[str, Any]) -> _Processed:
    """Run the steps, filling ``record``; raise ScanRejected for an unusable input."""
    timings, steps, metrics = record["timings_s"], record["steps"], record["metrics"]
    clock = _Clock(timings)

    img = read_nifti(in_file)
    record["input"] = describe_input(img)
    data, affine = validate_image(img, cfg["validation"], str(in_file))
    del img
    record["input"]["intensity_range"] = [float(data.min()), float(data.max())]
    clock.lap("load")

    if cfg["reorient"]:
        data, affine = reorient_to_ras(data, affine)
    steps["reorient"] = {
        "applied": bool(cfg["reorient"]),
        "from": record["input"]["orientation"],
        "to": axis_codes(affine),
    }
    clock.lap("reorient")

    working = float(cfg["working_spacing_mm"])
    work, work_affine = block_average(data, affine, block_factors(affine, working))
    head = foreground_mask(work)
    metrics["foreground_fraction"] = round(float(head.mean()), 4)
    flag = foreground_flag(metrics["foreground_fraction"], cfg["qc"])
    if flag:
        raise ScanRejected(flag, str(in_file))
    clock.lap("working_image")

    bias, reg = cfg["bias_correction"], cfg["registration"]
    aligned = correct_and_register(
        work, work_affine, head, cfg, str(in_file), clock.lap, native=(data, affine)
    )
    work, field, transform = aligned.work, aligned.field, aligned.transform
    steps["bias_correction"] = {
        **bias,
        "template_fit": {**bias["template_fit"], "applied": aligned.template_fit},
        "method": "N4 (ANTs), then a fit against the registered template's tissues",
        "applied": bool(bias["enabled"]),
        "fit_spacing_mm": _spacing(work_affine, bias["shrink_factor"]),
    }
    steps["registration"] = {
        **reg,
        "applied": bool(reg["enabled"]),
        "refined": aligned.refined,
        "template": TEMPLATE_NAME,
        "working_spacing_mm": _spacing(work_affine),
        "template_to_subject_ras": np.round(transform, 6).tolist(),
        "scaling_determinant": round(scaling_determinant(transform), 4),
    }

    res = cfg["resample"]
    grid_shape, grid_affine = output_grid(res)
    factors = (
        block_factors(affine, res["spacing_mm"], at_most=True) if res["antialias"] else [1] * 3
    )
    source, source_affine = block_average(data, affine, factors)
    volume = resample_to_grid(
        source, source_affine, grid_shape, grid_affine, transform, order=int(res["order"])
    )
    if field is not None:
        volume /= resample_to_grid(
            field, work_affine, grid_shape, grid_affine, transform, order=1, mode="nearest"
        )
    in_fov = inside_fov(grid_shape, grid_affine, data.shape, affine, transform)
    del data, source
    steps["resample"] = {
        **res,
        "applied": True,
        "shape": list(grid_shape),
        "antialias_block": factors,
    }
    clock.lap("resample")

    msk = cfg["mask"]
    brain = brain_mask_on_grid(grid_shape, grid_affine)
    mask = brain_mask_on_grid(grid_shape, grid_affine, float(msk["dilation_mm"]))
    voxel_ml = abs(np.linalg.det(grid_affine[:3, :3])) / 1000.0
    if reg["enabled"]:
        # Robust similarity and whether the transform is its local maximum (qc.local_optimum).
        optimum = local_optimum(work, work_affine, transform, working)
        metrics["registration_similarity"] = round(optimum.pop("similarity"), 4)
        metrics["registration_optimum"] = {k: round(v, 4) for k, v in optimum.items()}
    else:  # the identity is no optimum of anything: only the similarity floor applies
        metrics["registration_similarity"] = round(
            similarity_to_template(work, work_affine, transform, working), 4
        )
    # Head size as FreeSurfer's eTIV (a covariate; not checked: it measures the transform).
    metrics["etiv_ml"] = round(etiv_ml(transform), 1)
    metrics["mask_volume_ml"] = round(float(mask.sum() * voxel_ml), 1) if msk["enabled"] else None
    metrics["outside_fov_fraction"] = round(float(1.0 - in_fov[brain].mean()), 4)
    metrics["intensity"] = intensity_stats(volume, brain & in_fov)
    steps["mask"] = {**msk, "applied": bool(msk["enabled"]), "source": "template > 0.2, dilated"}
    clock.lap("mask_qc")

    stripped, ratio = _skull_stripped(cfg["skull_stripped"], head, work_affine, transform)
    steps["skull_stripped"] = {
        "setting": cfg["skull_stripped"],
        "detected": stripped,
        "foreground_over_etiv": round(ratio, 3),
    }
    norm = cfg["normalization"]
    # Voxels outside the input's field of view are zeros of the padding, not intensities.
    stats_mask = mask & in_fov if msk["enabled"] else in_fov
    if not stats_mask.any():
        raise ScanRejected("the brain mask lies entirely outside the field of view", str(in_file))
    if stripped:
        # The zeros around a stripped brain are not intensities either: statistics over the
        # subject's own brain voxels, like the brain tissue that dominates a whole head's mask.
        # Above 10 % of the in-mask 99th percentile: drops the zeros and the voxels that
        # interpolation blends with them at the brain's cut edge (CSF is 15-30 % of it in T1w).
        own = stats_mask & (volume > 0.1 * np.percentile(volume[stats_mask], 99))
        stats_mask = own if own.any() else stats_mask
    volume, used = normalize_intensity(volume, stats_mask, norm)
    if msk["enabled"] and not msk["keep_head"]:
        volume[~mask] = 0.0
    steps["normalization"] = {**norm, "applied": norm["method"] != "none", "statistics": used}
    clock.lap("normalization")
    return _Processed(volume, grid_affine, transform)


#: Foreground over eTIV below which ``skull_stripped: auto`` calls an input skull-stripped.
SKULL_STRIPPED_MAX_RATIO = 1.25


def _skull_stripped(
    setting: str | bool, head: np.ndarray, work_affine: np.ndarray, transform: np.ndarray
) -> tuple[bool, float]:
    """Whether to treat the input as skull-stripped, and its foreground volume over its eTIV."""
    head_ml = float(head.sum()) * abs(np.linalg.det(work_affine[:3, :3])) / 1000.0
    ratio = head_ml / etiv_ml(transform)
    if setting == "auto":
        return bool(ratio < SKULL_STRIPPED_MAX_RATIO), ratio
    return bool(setting), ratio


def _write_volume(processed: _Processed, path: Path) -> None:
    img = nib.Nifti1Image(processed.volume.astype(np.float32), processed.grid_affine)
    img.set_sform(processed.grid_affine, code="mni")
    img.set_qform(processed.grid_affine, code="mni")
    img.header.set_xyzt_units("mm")
    save_nifti_atomic(img, path)


def _write_mask(processed: _Processed, dilation_mm: float, path: Path) -> None:
    # The mask of the normalisation step (cached per grid), recomputed here from the grid.
    mask = brain_mask_on_grid(processed.volume.shape, processed.grid_affine, dilation_mm)
    img = nib.Nifti1Image(mask.astype(np.uint8), processed.grid_affine)
    img.set_data_dtype(np.uint8)
    img.set_sform(processed.grid_affine, code="mni")
    img.set_qform(processed.grid_affine, code="mni")
    img.header.set_xyzt_units("mm")
    save_nifti_atomic(img, path)


@dataclass
class Aligned:
    """What :func:`correct_and_register` found, at working resolution.

    Attributes:
        work: the working image divided by the final field (what QC measures).
        field: the final bias field (None without bias correction).
        transform: template to subject RAS+ mm (identity without registration).
        template_fit: whether the template fit gave the final field.
        refined: whether the registration was refined on the template-fitted image.
    """

    work: np.ndarray
    field: np.ndarray | None
    transform: np.ndarray
    template_fit: bool = False
    refined: bool = False


def _no_lap(name: str) -> None:
    pass


def correct_and_register(
    work: np.ndarray,
    work_affine: np.ndarray,
    head: np.ndarray,
    cfg: dict[str, Any],
    source: str = "",
    lap=_no_lap,
    native: tuple[np.ndarray, np.ndarray] | None = None,
) -> Aligned:
    """Bias correction and registration at working resolution, as :func:`preprocess_scan` runs them.

    N4 (``bias_correction``), so that registration sees a flatter image; the affine registration
    to the template (``registration``); the final field refitted against the registered
    template's tissues on the uncorrected image (``bias_correction.template_fit``); and, with
    ``registration.refine``, one more affine pass on the image corrected by that field, started
    from the first (no rigid stage): a strong field left by N4 no longer pulls the alignment.

    Args:
        work: the working-resolution image (not bias-corrected).
        work_affine: its affine (RAS+ mm).
        head: its head foreground (N4's mask).
        cfg: the full preprocessing config (after :func:`merge_config`).
        source: the input file, named by a rejection.
        lap: called with each step's name when it ends (the record's timings).
        native: the reoriented full-resolution image and its affine, for a refinement at
            ``registration.refine_spacing_mm`` finer than the working resolution.

    Raises:
        ScanRejected: N4 or the registration failed (ANTs raised).
    """
    bias, reg = cfg["bias_correction"], cfg["registration"]
    working = float(cfg["working_spacing_mm"])
    raw = work
    field = None
    if bias["enabled"]:
        try:
            field = n4_bias_field(work, work_affine, head, bias)
        except RuntimeError as err:  # ANTs reports a failed filter as RuntimeError
            raise ScanRejected(f"bias correction failed ({_one_line(err)})", source) from None
        work = raw / field
    lap("bias_correction")
    transform = np.eye(4)
    if reg["enabled"]:
        try:
            transform = register_to_template(
                work,
                work_affine,
                reg,
                working,
                score=lambda t: similarity_to_template(work, work_affine, t, working),
            )
        except RuntimeError as err:  # ANTs reports a failed registration as RuntimeError
            raise ScanRejected(f"registration failed ({_one_line(err)})", source) from None
    lap("registration")
    fitted = refined = False
    if field is not None and bias["template_fit"]["enabled"] and reg["enabled"]:
        refit = template_bias_field(raw, work_affine, transform, bias["template_fit"], working)
        if refit is not None:
            field, work, fitted = refit, raw / refit, True
    lap("template_fit")
    if fitted and reg["refine"]:
        image, image_affine, spacing, levels = work, work_affine, working, reg
        fine = reg["refine_spacing_mm"]
        if fine is not None and float(fine) < working and native is not None:
            spacing = float(fine)
            image, image_affine = block_average(*native, block_factors(native[1], spacing))
            image = image / resample_to_grid(
                field, work_affine, image.shape, image_affine, order=1, mode="nearest"
            )
            # the alignment is close already: one level at that resolution
            levels = {**reg, "iterations": [50], "shrink_factors": [1], "smoothing_sigmas_vox": [0]}
        try:
            candidate = register_to_template(
                image, image_affine, levels, spacing, initial=transform
            )
        except RuntimeError as err:
            raise ScanRejected(f"registration failed ({_one_line(err)})", source) from None
        # at the working resolution, kept only where it raises the similarity QC measures (on a
        # noisy image the metric's random samples can pull it off the maximum: 2 of 72
        # strong-bias demo scans); a finer refinement is asked for and kept
        keep = spacing < working or similarity_to_template(
            work, work_affine, candidate, working
        ) > similarity_to_template(work, work_affine, transform, working)
        if keep:
            transform, refined = candidate, True
    lap("refine_registration")
    return Aligned(work, field, transform, fitted, refined)


class _Clock:
    """Seconds per step into a dict, for the record and the benchmark."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now


def _spacing(affine: np.ndarray, factor: int = 1) -> list[float]:
    return [round(float(z) * factor, 3) for z in np.linalg.norm(affine[:3, :3], axis=0)]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _software_versions() -> dict[str, str]:
    # From the installed metadata: importing the packages just for this would cost seconds.
    import nidl_dino

    versions = {"nidl_dino": nidl_dino.__version__}
    for package in ("antspyx", "nibabel", "nilearn", "numpy", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
