"""Write the demo cohort as a BIDS dataset: demographics, scans, deliberately bad scans, tables."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from nidl_dino.demo import anatomy as anat
from nidl_dino.demo import scanner
from nidl_dino.demo.variant import DEFAULT_VARIANT, CohortVariant, get_variant
from nidl_dino.errors import UserError

logger = logging.getLogger(__name__)

GENERATOR_NAME = "nidl_dino.demo"
MANIFEST_NAME = "demo_manifest.tsv"
VARIANT_NAME = "demo_variant.json"
BAD_KINDS = ("truncated", "empty", "noise", "nan")
AGE_RANGE = (20.0, 80.0)
SESSION_GAP_YEARS = (1.0, 3.0)
PARTICIPANT_COLUMNS = ("participant_id", "age", "sex", "site")

# Spawn keys of the random streams: cohort design, subject anatomy, one scan, subject lesions.
# Lesions have a stream of their own, so that a variant with lesions draws every other latent
# (and every scan) exactly as the variant without them.
_COHORT, _SUBJECT, _SCAN, _LESIONS = 0, 1, 2, 3


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def design_cohort(
    n_subjects: int,
    seed: int,
    sites: Sequence[scanner.SiteProtocol],
    n_bad: int,
    bad_kinds: Sequence[str],
) -> pd.DataFrame:
    """Draw the cohort's demographics and choose its bad scans.

    Site and sex are balanced in blocks: every run of ``2 * len(sites)`` consecutive subjects holds
    each (site, sex) pair once, in random order. Ages are stratified: one per ``60 / n`` year bin of
    20-80, randomly assigned, so age is independent of site and sex by design.

    Returns:
        One row per subject: ``participant_id``, ``age`` (years, 0.1 precision), ``sex`` (M/F),
        ``site``, ``bad_scan`` (a kind of :data:`BAD_KINDS`, or empty).
    """
    rng = _rng(seed, _COHORT)
    cells = [(s.name, sex) for s in sites for sex in ("F", "M")]
    order: list[tuple[str, str]] = []
    while len(order) < n_subjects:
        order.extend(cells[j] for j in rng.permutation(len(cells)))
    lo, hi = AGE_RANGE
    ages = (
        lo + (hi - lo) * (rng.permutation(n_subjects) + rng.uniform(size=n_subjects)) / n_subjects
    )
    bad = np.sort(rng.choice(n_subjects, size=n_bad, replace=False)) if n_bad else []
    kinds = [""] * n_subjects
    for j, i in enumerate(bad):
        kinds[int(i)] = bad_kinds[j % len(bad_kinds)]
    width = max(3, len(str(n_subjects)))
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:0{width}d}" for i in range(n_subjects)],
            "age": np.round(ages, 1),
            "sex": [sex for _, sex in order[:n_subjects]],
            "site": [site for site, _ in order[:n_subjects]],
            "bad_scan": kinds,
        }
    )


def _bad_image(
    kind: str, site: scanner.SiteProtocol, rng: np.random.Generator, good: nib.Nifti1Image
) -> bytes:
    """The ``.nii.gz`` bytes of a bad scan of ``kind`` at ``site``.

    ``truncated``: the first 40 % of the gzip stream of a good scan (header readable, data not);
    ``empty``: all zeros; ``noise``: Rician noise with no anatomy; ``nan``: float32, all NaN.
    """
    shape, affine = site.grid()
    descrip = f"nidl-dino demo {site.name}"
    if kind == "truncated":
        data = scanner.nifti_gz_bytes(good)
        return data[: int(0.4 * len(data))]
    if kind == "empty":
        img = scanner.to_nifti(np.zeros(shape, np.float32), affine, site.dtype, descrip)
    elif kind == "noise":
        sigma = 0.3 * site.white_matter_value
        noise = np.hypot(rng.standard_normal(shape), rng.standard_normal(shape)) * sigma
        img = scanner.to_nifti(noise.astype(np.float32) + site.offset, affine, site.dtype, descrip)
    elif kind == "nan":
        img = scanner.to_nifti(np.full(shape, np.nan, np.float32), affine, "float32", descrip)
    else:
        raise ValueError(f"bad scan kind {kind!r} not in {BAD_KINDS}")
    return scanner.nifti_gz_bytes(img)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    _write_text(path, table.to_csv(sep="\t", index=False, lineterminator="\n", na_rep="n/a"))


def is_demo_dataset(path: Path) -> bool:
    """Whether ``path`` holds a dataset written by :func:`make_demo_dataset`."""
    try:
        desc = json.loads((Path(path) / "dataset_description.json").read_text(encoding="utf-8"))
        return desc["GeneratedBy"][0]["Name"] == GENERATOR_NAME
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def recorded_variant(path: Path) -> str | None:
    """Name of the variant a demo dataset was generated with (None if ``path`` is not a demo).

    Datasets of the default variant carry no ``demo_variant.json`` (their bytes are those of
    the demo before variants existed): they report ``"default"``.
    """
    path = Path(path)
    if not is_demo_dataset(path):
        return None
    try:
        return str(json.loads((path / VARIANT_NAME).read_text(encoding="utf-8"))["name"])
    except FileNotFoundError:
        return DEFAULT_VARIANT.name
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _holds_files(path: Path) -> bool:
    """Whether anything but (possibly nested) empty directories lies below ``path``."""
    return any(not p.is_dir() or p.is_symlink() for p in path.rglob("*"))


def _check_out_dir(out: Path) -> None:
    """Refuse an ``out`` that exists and is neither empty nor an earlier demo.

    Empty means no file at any depth: Snakemake makes the folders of a rule's declared outputs
    (``sub-*/anat/``) before the job that writes the cohort runs.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output path")
    if not is_demo_dataset(out) and _holds_files(out):
        raise UserError(
            f"{out}: exists, is not empty and is not a nidl-dino demo dataset; "
            "choose a new or empty directory"
        )


def _move_into_place(partial: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or an earlier demo) by the finished ``partial`` tree."""
    if out.exists():
        if is_demo_dataset(out) or not _holds_files(out):
            shutil.rmtree(out)
        else:  # appeared since the check: never delete a user's files
            raise UserError(f"{out}: files appeared there while the demo was written; not replaced")
    partial.rename(out)


def scan_path(participant: str, session: str) -> Path:
    """Where a demo scan lies below the dataset root: ``sub-*/[ses-*/]anat/<name>_T1w.nii.gz``."""
    parts = [participant] + ([session] if session else [])
    return Path(*parts, "anat", "_".join(parts) + "_T1w.nii.gz")


def _session_ids(sessions: bool) -> list[str]:
    return ["ses-01", "ses-02"] if sessions else [""]


def planned_files(
    n_subjects: int = 24,
    seed: int = 0,
    sessions: bool = False,
    *,
    variant: str | CohortVariant | None = None,
) -> dict[str, list[str]]:
    """The files :func:`make_demo_dataset` writes with these arguments, without writing them.

    Cheap (the cohort design only, no image): the workflow plans its jobs on this list before
    the job that generates the cohort runs, so a dry run writes nothing.

    Returns:
        ``scans``: the scans' paths relative to the dataset root, in the order written;
        ``tables``: the dataset-level files (``dataset_description.json``, ``participants.tsv``).
    """
    cohort = design_cohort(n_subjects, seed, get_variant(variant).sites, 0, BAD_KINDS)
    scans = [
        scan_path(participant, session).as_posix()
        for participant in cohort["participant_id"]
        for session in _session_ids(sessions)
    ]
    return {"scans": scans, "tables": ["dataset_description.json", "participants.tsv"]}


def _describe(
    out: Path,
    sites: Sequence[scanner.SiteProtocol],
    call: str,
    sessions: bool,
    variant: CohortVariant,
) -> None:
    from nidl_dino import __version__

    _write_json(
        out / "dataset_description.json",
        {
            "Name": "nidl-dino synthetic T1w demo cohort",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "HowToAcknowledge": (
                "Synthetic images derived from the ICBM 2009a nonlinear symmetric MNI152 template "
                "(Fonov et al., NeuroImage 2009 and 2011; copyright McConnell Brain Imaging "
                "Centre) as shipped with nilearn."
            ),
            "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": __version__, "Description": call}],
        },
    )
    site_levels = {
        s.name: f"{s.axcodes}, {'x'.join(f'{v:g}' for v in s.voxel_size_mm)} mm voxels, {s.dtype}"
        + (f", contrast exponent {s.contrast:g}" if s.contrast != 1.0 else "")
        for s in sites
    }
    _write_json(
        out / "participants.json",
        {
            "participant_id": {"Description": "Participant label, sub-<label>."},
            "age": {
                "Description": "Age at the first session" if sessions else "Age at the scan",
                "Units": "year",
            },
            "sex": {
                "Description": "Sex, which drives head size and a shape mode in the generator",
                "Levels": {"M": "male", "F": "female"},
            },
            "site": {"Description": "Acquisition site (protocol)", "Levels": site_levels},
        },
    )
    if variant == DEFAULT_VARIANT:
        _write_text(out / ".bidsignore", f"{MANIFEST_NAME}\n")
    else:
        _write_json(out / VARIANT_NAME, variant.to_dict())
        _write_text(out / ".bidsignore", f"{MANIFEST_NAME}\n{VARIANT_NAME}\n")


def make_demo_dataset(
    out_dir: str | Path,
    n_subjects: int = 24,
    seed: int = 0,
    sessions: bool = False,
    n_bad: int = 2,
    *,
    variant: str | CohortVariant | None = None,
    sites: Sequence[scanner.SiteProtocol] | None = None,
    bad_kinds: Sequence[str] = BAD_KINDS,
    workers: int = 1,
) -> pd.DataFrame:
    """Generate the synthetic T1w demo cohort as a BIDS dataset.

    Writes ``dataset_description.json``, ``participants.tsv`` / ``.json``, one
    ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_T1w.nii.gz`` per scan,
    ``sub-<label>/sub-<label>_sessions.tsv`` with sessions, and ``demo_manifest.tsv`` (ground truth
    per scan, listed in ``.bidsignore``); a variant other than the default adds
    ``demo_variant.json`` (its knobs, also in ``.bidsignore``). Same arguments, same bytes.

    Args:
        out_dir: Output directory; must be absent, empty, or an earlier demo (then replaced).
        n_subjects: Number of subjects (>= 1).
        seed: Seed of every random draw.
        sessions: Two sessions per subject, 1-3 years apart, instead of one scan.
        n_bad: Number of subjects with a deliberately bad scan (their last session).
        variant: A :class:`~nidl_dino.demo.variant.CohortVariant` or the name of a preset
            (:data:`~nidl_dino.demo.variant.PRESETS`); None: ``"default"``, today's demo.
        sites: Site protocols, replacing the variant's; subjects are spread evenly across them.
        bad_kinds: Kinds of bad scans, assigned in turn to the bad subjects (see
            :data:`BAD_KINDS`).
        workers: Processes that write subjects at once (each subject draws from its own seeded
            generator, so any number gives the same bytes); 1 writes them in this process.

    Returns:
        The participants table (``participant_id``, ``age``, ``sex``, ``site``) with one more
        column, ``bad_scan``: the kind of the subject's bad scan, empty when all are good. Only
        the first four columns are written to participants.tsv.

    Raises:
        ValueError: If ``n_subjects``, ``n_bad``, ``variant``, ``sites`` or ``bad_kinds`` are
            invalid.
        nidl_dino.errors.UserError: If ``out_dir`` exists and is neither empty nor a demo dataset.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if not 0 <= n_bad <= n_subjects:
        raise ValueError(f"n_bad must be between 0 and n_subjects ({n_subjects}), got {n_bad}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    variant = get_variant(variant)
    if sites is not None:
        if not sites or len({s.name for s in sites}) != len(sites):
            raise ValueError("sites must be a non-empty sequence of protocols with distinct names")
        variant = variant.replace(sites=tuple(sites))
    unknown = sorted(set(bad_kinds) - set(BAD_KINDS))
    if unknown or not bad_kinds:
        raise ValueError(f"bad_kinds must be a non-empty subset of {BAD_KINDS}, got {bad_kinds}")

    out = Path(out_dir).absolute()
    _check_out_dir(out)
    # Written next to out_dir and moved into place at the end, so an interrupted run leaves no
    # half-written dataset that a later run (or the workflow) would take for a finished one.
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        cohort = _write_dataset(
            partial, n_subjects, seed, sessions, n_bad, variant, bad_kinds, workers
        )
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return cohort


def _write_dataset(
    out: Path,
    n_subjects: int,
    seed: int,
    sessions: bool,
    n_bad: int,
    variant: CohortVariant,
    bad_kinds: Sequence[str],
    workers: int = 1,
) -> pd.DataFrame:
    """Write the whole dataset into ``out`` (an empty directory); return the cohort table."""
    sites = variant.sites
    # The default variant's call reads as it did before variants existed (same bytes).
    named = "" if variant == DEFAULT_VARIANT else f", variant={variant.name!r}"
    call = (
        f"make_demo_dataset(n_subjects={n_subjects}, seed={seed}, sessions={sessions}, "
        f"n_bad={n_bad}, sites={[s.name for s in sites]}, bad_kinds={list(bad_kinds)}{named})"
    )
    _describe(out, sites, call, sessions, variant)
    cohort = design_cohort(n_subjects, seed, sites, n_bad, bad_kinds)
    _write_tsv(out / "participants.tsv", cohort.loc[:, list(PARTICIPANT_COLUMNS)])
    site_of = {s.name: s for s in sites}

    records = []
    start = time.perf_counter()
    jobs = [
        # rows as plain namespaces: itertuples' namedtuple class cannot be pickled to a worker
        (out, i, SimpleNamespace(**row._asdict()), seed, site_of[row.site], sessions, variant)
        for i, row in enumerate(cohort.itertuples(index=False))
    ]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs))))
            done = pool.map(_write_subject, *zip(*jobs, strict=True))
        else:
            done = (_write_subject(*job) for job in jobs)
        for (_, i, row, *_), rows in zip(jobs, done, strict=True):  # in subject order
            records += rows
            logger.info("%s done (%d/%d)", row.participant_id, i + 1, n_subjects)
    manifest = pd.DataFrame.from_records(records)
    _write_tsv(out / MANIFEST_NAME, manifest.round(4))
    elapsed = time.perf_counter() - start
    logger.info(
        "%d scans in %.1f s (%.2f s per scan)", len(records), elapsed, elapsed / len(records)
    )
    return cohort


def _write_subject(
    out: Path,
    i: int,
    row: Any,
    seed: int,
    site: scanner.SiteProtocol,
    sessions: bool,
    variant: CohortVariant,
) -> list[dict[str, Any]]:
    """Write subject ``i`` of a designed cohort (its scans, sessions table); its manifest rows."""
    subject_rng = _rng(seed, _SUBJECT, i)
    anatomy = anat.draw_anatomy(subject_rng, row.sex)
    if variant.lesion_count > 0:
        lesions = anat.draw_lesions(_rng(seed, _LESIONS, i), variant)
        anatomy = dataclasses.replace(anatomy, lesions=lesions)
    ages = [float(row.age)]
    if sessions:
        ages.append(round(ages[0] + subject_rng.uniform(*SESSION_GAP_YEARS), 1))
    session_ids = _session_ids(sessions)
    records = []
    for k, (session, age) in enumerate(zip(session_ids, ages, strict=True)):
        defect = row.bad_scan if k == len(ages) - 1 else ""
        rng = _rng(seed, _SCAN, i, k)
        records.append(
            _write_scan(out, row.participant_id, session, site, anatomy, age, defect, rng, variant)
        )
    if sessions:
        _write_tsv(
            out / row.participant_id / f"{row.participant_id}_sessions.tsv",
            pd.DataFrame({"session_id": session_ids, "age": ages}),
        )
    return records


def make_demo_subject(
    out_dir: str | Path,
    participant_id: str,
    n_subjects: int,
    seed: int = 0,
    n_bad: int = 2,
    *,
    variant: str | CohortVariant | None = None,
    bad_kinds: Sequence[str] = BAD_KINDS,
) -> dict[str, Any]:
    """One subject of the cohort :func:`make_demo_dataset` would make, the same bytes, alone.

    For reproducing one scan of a large generated cohort (a test, a bug report) without
    generating the others: the cohort design depends on ``n_subjects``, so give the cohort's.
    Writes ``<out_dir>/<participant_id>/...`` only (no dataset files).

    Returns:
        The scan's manifest row (as in ``demo_manifest.tsv``; the last session's with sessions).

    Raises:
        ValueError: an unknown participant for that design.
    """
    variant = get_variant(variant)
    cohort = design_cohort(n_subjects, seed, variant.sites, n_bad, bad_kinds)
    index = cohort.index[cohort["participant_id"] == participant_id]
    if not len(index):
        raise ValueError(f"{participant_id} is not in a cohort of {n_subjects} subjects")
    i = int(cohort.index.get_loc(index[0]))
    row = next(cohort.iloc[[i]].itertuples(index=False))
    site = {s.name: s for s in variant.sites}[row.site]
    return _write_subject(Path(out_dir), i, row, seed, site, False, variant)[-1]


def _write_scan(
    out: Path,
    participant: str,
    session: str,
    site: scanner.SiteProtocol,
    anatomy: anat.Anatomy,
    age: float,
    defect: str,
    rng: np.random.Generator,
    variant: CohortVariant,
) -> dict:
    """Simulate and write one scan (bad if ``defect`` names a kind); return its manifest row.

    The row has ``lesion_count`` and ``lesion_ml`` for variants with lesions and
    ``wm_intensity`` for variants whose white matter changes with age (the default has neither).
    """
    acq = scanner.draw_acquisition(rng, site, variant)
    rel = scan_path(participant, session)
    maps = anat.tissue_maps(anatomy, age, variant)
    good = None
    if defect in ("", "truncated"):
        image = anat.template_intensity(anatomy, maps, age, variant)
        good = scanner.acquire(site, anatomy, acq, image, rng, variant)
    data = _bad_image(defect, site, rng, good) if defect else scanner.nifti_gz_bytes(good)
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(data)

    scale = float(np.prod(anatomy.head_scale))
    row = {
        "participant_id": participant,
        "session_id": session,
        "path": rel.as_posix(),
        "site": site.name,
        "age": age,
        "sex": anatomy.sex,
        "bad_scan": defect,
        "icv_ml": anat.load_template().brain_ml * scale,
        "ventricles_ml": maps.vent_ml * scale,
        "gm_ml": maps.gm_ml * scale,
        "wm_ml": maps.wm_ml * scale,
        "csf_ml": maps.csf_ml * scale,
        "gm_intensity": anat.gm_intensity(anatomy, age, variant),
        "head_scale_x": anatomy.head_scale[0],
        "head_scale_y": anatomy.head_scale[1],
        "head_scale_z": anatomy.head_scale[2],
        "sex_mode_mm": anatomy.sex_mode_mm,
        "rotation_x_deg": acq.rotation_deg[0],
        "rotation_y_deg": acq.rotation_deg[1],
        "rotation_z_deg": acq.rotation_deg[2],
        "shift_x_mm": acq.shift_mm[0],
        "shift_y_mm": acq.shift_mm[1],
        "shift_z_mm": acq.shift_mm[2],
        "gain": acq.gain,
    }
    if variant.wm_intensity_gain != 0:
        row["wm_intensity"] = anat.wm_intensity(age, variant)
    if variant.lesion_count > 0:
        row["lesion_count"] = maps.lesion_count
        row["lesion_ml"] = maps.lesion_ml * scale
    return row
