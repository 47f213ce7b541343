"""Where every output below ``output_dir`` lives.

The Snakefile, the rules' scripts and the package take every path below ``output_dir`` from
here; no other module spells one, so a rename happens in this file only. The tree::

    <output_dir>/
      dataset_description.json, .bidsignore       the BIDS-derivatives dataset (derivatives.py)
      sub-<label>/[ses-<label>/]anat/             one set of files per scan (fMRIPrep's names):
        <source>_space-<space>_res-<r>_desc-preproc_T1w.nii.gz    the preprocessed volume
        <source>_space-<space>_res-<r>_desc-brain_mask.nii.gz     its brain mask (uint8, 0/1)
        <source>_from-T1w_to-<space>_mode-image_xfm.mat          the affine (ITK/ANTs file)
        <source>_desc-qc_T1w.json, <source>_desc-qc_T1w.png      QC record and picture
        .<source>.nidl-dino-done.json            what they were made from (jobs.py skips it)
      preproc/batches/batch-NNNN.tsv              one table per preprocessing job
      qc/qc.tsv
      features/<scan_id>.tsv, manifest.tsv, .extracted.tsv, cohort.tsv, cohort.parquet
      features/baselines/<name>.parquet           the baselines' inputs (random_encoder, ...)
      model/teacher.pt, model_card.json, model_card.md, training_curves.png, training_summary.json
      model/work/                                 checkpoints, logs, caches of training.py
      probes/scores.tsv, predictions.tsv, comparison.tsv, probe_table.md
      report/report.html, report/montage/         (report.py names the montage pages)
      logs/<rule>.log, logs/preprocess/<batch or scan_id>.log
      .cache/scans-<hash>.tsv                     the scan list of a configuration (workflow.py)

Names, as fMRIPrep writes them (BIDS 1.10 derivatives):

- ``<source>`` is the input's own entities without its suffix, in BIDS order:
  ``sub-01_ses-1_acq-mprage_run-2`` for ``sub-01_ses-1_acq-mprage_run-2_T1w.nii.gz``. It keeps
  every entity of the input, where the scan id keeps only those that tell a subject's scans
  apart (:mod:`nidl_dino.workflow.inputs`): ``sub-01`` for a subject's one ``sub-01_acq-mprage_T1w``.
  :func:`scan_sources` gives the source of each scan id; a scan id without one is its own.
- ``<space>`` is :data:`SPACE`, the TemplateFlow name of the template we register to.
- ``res-<r>`` is the output grid spacing in millimetres (``preprocessing.resample.spacing_mm``),
  ``p`` for the decimal point: ``res-3`` for 3 mm, ``res-1p5`` for 1.5 mm (:func:`res_label`).
  TemplateFlow's ``res`` is an index into a template's own resolutions instead; our grid is not
  one of those, so the label says its spacing.

Example:
    >>> layout = Layout("results", spacing_mm=3.0, sources={"sub-01": "sub-01_run-2"})
    >>> layout.scan("sub-01").volume.as_posix()
    'results/sub-01/anat/sub-01_run-2_space-MNI152NLin2009aSym_res-3_desc-preproc_T1w.nii.gz'
    >>> layout.qc_tsv.as_posix()
    'results/qc/qc.tsv'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nidl_dino.settings import defaults, with_defaults

#: TemplateFlow name of the template the registration targets: nilearn's
#: ``mni_icbm152_t1_tal_nlin_sym_09a`` (ICBM 2009a nonlinear symmetric, see
#: :mod:`nidl_dino.preprocessing.template`), ``tpl-MNI152NLin2009aSym`` in TemplateFlow.
SPACE = "MNI152NLin2009aSym"
#: Spacing (mm) of the output grid when the configuration does not say (the schema's default).
DEFAULT_SPACING_MM: float = defaults("preprocessing", "resample", "spacing_mm")
#: The extraction's own copy of the manifest, in the features folder (features.py).
EXTRACTION_STATE = ".extracted.tsv"
#: The baselines' inputs that the extract job writes for the probes.
BASELINES = ("random_encoder", "intensities", "brain_histogram")

#: ``.bidsignore``: what a BIDS validator should not look into. Our own folders hold no
#: BIDS-named files; the QC sidecars are not BIDS files; transforms (``_xfm``) are not in the
#: specification yet (BEP014); the signature files are ours.
BIDSIGNORE = (
    "qc/",
    "features/",
    "model/",
    "probes/",
    "report/",
    "logs/",
    "preproc/",
    "**/*_desc-qc_T1w.json",
    "**/*_desc-qc_T1w.png",
    "**/*_xfm.mat",
    "**/.*.nidl-dino-done.json",
    ".cache/",
    ".snakemake/",
)

_LABEL = r"[A-Za-z0-9]+"
_SOURCE_RE = re.compile(rf"(sub-{_LABEL})(?:_(ses-{_LABEL}))?(?:_{_LABEL}-{_LABEL})*")
_VOLUME_RE = re.compile(rf"(?P<source>.+)_space-{_LABEL}_res-{_LABEL}_desc-preproc_T1w\.nii\.gz")


def res_label(spacing_mm: float) -> str:
    """The ``res-`` label of a grid spacing in mm: ``"3"`` for 3.0, ``"1p5"`` for 1.5.

    Raises:
        ValueError: a spacing that is not a positive number of mm.
    """
    spacing = float(spacing_mm)
    text = f"{spacing:.6f}".rstrip("0").rstrip(".")  # micrometre precision, no exponent
    if not spacing > 0 or not re.fullmatch(r"[0-9]+(\.[0-9]+)?", text) or float(text) == 0:
        raise ValueError(f"grid spacing {spacing_mm!r} mm has no res- label")
    return text.replace(".", "p")


def source_name(
    participant_id: str, session_id: str = "", entities: Mapping[str, Any] | None = None
) -> str:
    """A scan's ``<source>``: ``sub-<label>[_ses-<label>]`` and its entities in BIDS order.

    Args:
        participant_id: ``sub-<label>``.
        session_id: ``ses-<label>``, or ``""`` without sessions.
        entities: entity -> label (``{"run": "2"}``); empty or missing labels are left out.
            Known entities go in the specification's order (:data:`nidl_dino.workflow.inputs.ENTITY_ORDER`),
            others after them, alphabetically.
    """
    from nidl_dino.workflow.inputs import ENTITY_ORDER

    given = {
        str(k): str(v) for k, v in (entities or {}).items() if isinstance(v, str | int) and str(v)
    }
    order = [k for k in ENTITY_ORDER if k in given] + sorted(set(given) - set(ENTITY_ORDER))
    return "_".join(
        [participant_id, *filter(None, [session_id])] + [f"{k}-{given[k]}" for k in order]
    )


def scan_sources(scans: Any) -> dict[str, str]:
    """Scan id -> ``<source>`` of every scan whose source is not its scan id.

    Args:
        scans: the scan list (:func:`nidl_dino.workflow.inputs.discover_scans`): ``scan_id``,
            ``participant_id``, ``session_id``, ``path`` and one column per entity.
    """
    from nidl_dino.workflow.inputs import ID_COLUMNS

    entity_columns = [c for c in scans.columns if c not in ID_COLUMNS]
    sources = {}
    for row in scans.to_dict("records"):
        session = row["session_id"] if isinstance(row["session_id"], str) else ""
        source = source_name(row["participant_id"], session, {k: row[k] for k in entity_columns})
        if source != row["scan_id"]:
            sources[row["scan_id"]] = source
    return sources


def anat_folder(source: str) -> Path:
    """``sub-<label>/[ses-<label>/]anat``, the folder of a ``<source>`` (relative).

    Raises:
        ValueError: ``source`` is not ``sub-<label>[_ses-<label>][_<key>-<value>...]``.
    """
    match = _SOURCE_RE.fullmatch(source)
    if match is None:
        raise ValueError(f"{source!r} is not a BIDS source name (sub-<label>[_ses-<label>]...)")
    return Path(*filter(None, match.groups()), "anat")


def source_of_volume(path: str | os.PathLike) -> str | None:
    """The ``<source>`` of a preprocessed volume's file name, or None for another name."""
    match = _VOLUME_RE.fullmatch(os.path.basename(str(path)))
    return match["source"] if match else None


@dataclass(frozen=True)
class ScanFiles:
    """The files of one preprocessed scan, all in ``folder``, named after ``source``."""

    folder: Path
    source: str
    spacing_mm: float = DEFAULT_SPACING_MM

    @property
    def _grid(self) -> str:
        return f"{self.source}_space-{SPACE}_res-{res_label(self.spacing_mm)}"

    @property
    def volume(self) -> Path:
        """The preprocessed volume (float32, on the template grid)."""
        return self.folder / f"{self._grid}_desc-preproc_T1w.nii.gz"

    @property
    def mask(self) -> Path:
        """The brain mask the volume was masked with (uint8, 0/1, the volume's grid)."""
        return self.folder / f"{self._grid}_desc-brain_mask.nii.gz"

    @property
    def transform(self) -> Path:
        """The affine from the T1w to the template (ITK/ANTs ``.mat``)."""
        return self.folder / f"{self.source}_from-T1w_to-{SPACE}_mode-image_xfm.mat"

    @property
    def qc_json(self) -> Path:
        """The QC record, written last."""
        return self.folder / f"{self.source}_desc-qc_T1w.json"

    @property
    def qc_png(self) -> Path:
        """The QC picture (three orthogonal slices)."""
        return self.folder / f"{self.source}_desc-qc_T1w.png"

    @property
    def signature(self) -> Path:
        """What the files were made from (input file and configuration) and the scan's QC
        record (jobs.py)."""
        return self.folder / f".{self.source}.nidl-dino-done.json"

    @property
    def qc_png_kept(self) -> Path:
        """A second name (hard link, else copy) of the QC picture, which the workflow does not
        declare: restored from when Snakemake deletes a rerun job's declared outputs."""
        return self.folder / f".{self.source}.nidl-dino-qc.png"


@dataclass(frozen=True)
class Layout:
    """The paths of one run's outputs.

    Args:
        output_dir: the run's ``output_dir``.
        spacing_mm: the output grid spacing (``preprocessing.resample.spacing_mm``), which the
            preprocessed files are named after (``res-``).
        sources: scan id -> ``<source>`` where they differ (:func:`scan_sources`).
    """

    output_dir: Path
    spacing_mm: float = DEFAULT_SPACING_MM
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))
        res_label(self.spacing_mm)  # a spacing without a label fails here, not at first use

    @classmethod
    def from_config(cls, config: Mapping[str, Any], sources: Mapping[str, str] | None = None):
        """The layout of a workflow configuration (``output_dir``, the grid spacing).

        Raises:
            UserError: a grid spacing without a ``res-`` label (not a positive number).
        """
        from nidl_dino.errors import UserError

        resample = with_defaults(config.get("preprocessing"), "preprocessing")["resample"]
        spacing = resample["spacing_mm"]
        try:
            res_label(spacing)
        except (TypeError, ValueError):
            raise UserError(
                f"preprocessing.resample.spacing_mm = {spacing!r} is not a grid spacing in mm: "
                "give a positive number such as 1.5"
            ) from None
        return cls(Path(str(config["output_dir"])), spacing, dict(sources or {}))

    def params(self, scan_ids: Iterable[str] | None = None) -> dict[str, Any]:
        """Plain values that rebuild this layout (``Layout(**params)``), for a rule's params.

        Args:
            scan_ids: the scans the rule reads or writes (None: all), so that a job's params
                change only when its own scans' names do.
        """
        keep = None if scan_ids is None else set(scan_ids)
        return {
            "output_dir": str(self.output_dir),
            "spacing_mm": self.spacing_mm,
            "sources": {k: v for k, v in self.sources.items() if keep is None or k in keep},
        }

    def _under(self, *parts: str) -> Path:
        return self.output_dir.joinpath(*parts)

    # ------------------------------------------------------------------ preprocessing
    def scan(self, scan_id: str) -> ScanFiles:
        """The preprocessed files of a scan, in ``sub-<label>/[ses-<label>/]anat/``."""
        source = self.sources.get(scan_id, scan_id)
        return ScanFiles(self.output_dir / anat_folder(source), source, self.spacing_mm)

    def preproc_batch(self, batch: str) -> Path:
        """The table of a preprocessing job (``scan_id``, ``status``, ``reason``)."""
        return self._under("preproc", "batches", f"{batch}.tsv")

    @property
    def qc_tsv(self) -> Path:
        return self._under("qc", "qc.tsv")

    # ------------------------------------------------------------------ features
    @property
    def features_dir(self) -> Path:
        return self._under("features")

    def feature_table(self, scan_id: str) -> Path:
        """A scan's feature table, ``features/<scan_id>.tsv``."""
        return self.features_dir / feature_table_name(scan_id)

    @property
    def features_manifest(self) -> Path:
        return self.features_dir / "manifest.tsv"

    @property
    def cohort_tsv(self) -> Path:
        return self.features_dir / "cohort.tsv"

    @property
    def cohort_parquet(self) -> Path:
        return self.features_dir / "cohort.parquet"

    @property
    def baselines_dir(self) -> Path:
        return self.features_dir / "baselines"

    def baseline(self, name: str) -> Path:
        """A baseline's input table (one of :data:`BASELINES`)."""
        if name not in BASELINES:
            raise ValueError(f"no baseline {name!r}: one of {', '.join(BASELINES)}")
        return self.baselines_dir / baseline_table_name(name)

    # ------------------------------------------------------------------ model
    @property
    def model_dir(self) -> Path:
        return self._under("model")

    @property
    def teacher(self) -> Path:
        return self.model_dir / "teacher.pt"

    @property
    def model_card_json(self) -> Path:
        return card_beside(self.teacher)

    @property
    def model_card_md(self) -> Path:
        return self.model_dir / "model_card.md"

    @property
    def training_curves(self) -> Path:
        return self.model_dir / "training_curves.png"

    @property
    def training_summary(self) -> Path:
        return self.model_dir / "training_summary.json"

    @property
    def model_work(self) -> Path:
        """Checkpoints and logs of training (not a declared output: kept for a resume)."""
        return self.model_dir / "work"

    # ------------------------------------------------------------------ probes, report
    @property
    def probe_scores(self) -> Path:
        return self._under("probes", "scores.tsv")

    @property
    def probe_predictions(self) -> Path:
        return self._under("probes", "predictions.tsv")

    @property
    def probe_comparison(self) -> Path:
        return self._under("probes", "comparison.tsv")

    @property
    def probe_table(self) -> Path:
        return self._under("probes", "probe_table.md")

    @property
    def report_html(self) -> Path:
        return self._under("report", "report.html")

    @property
    def report_montage(self) -> Path:
        return self._under("report", "montage")

    # ------------------------------------------------------------------ dataset, logs, caches
    @property
    def dataset_description(self) -> Path:
        return self._under("dataset_description.json")

    @property
    def bidsignore(self) -> Path:
        return self._under(".bidsignore")

    def log(self, rule: str) -> Path:
        """The log of a cohort-wide job, ``logs/<rule>.log``."""
        return self._under("logs", f"{rule}.log")

    @property
    def preprocess_logs(self) -> Path:
        """Folder of the preprocessing logs: one per batch job, one per scan."""
        return self._under("logs", "preprocess")

    def preprocess_log(self, name: str) -> Path:
        """``logs/preprocess/<name>.log``, ``name`` a batch or a scan id."""
        return preprocess_log_in(self.preprocess_logs, name)

    def scan_cache(self, key: str) -> Path:
        """The cached scan list of a configuration whose discovery hashes to ``key``."""
        return self._under(".cache", f"scans-{key}.tsv")


def feature_table_name(scan_id: str) -> str:
    """File name of a scan's feature table in the features folder (INTERFACE.md)."""
    return f"{scan_id}.tsv"


def baseline_table_name(name: str) -> str:
    """File name of a baseline's input table in the baselines folder."""
    return f"{name}.parquet"


def card_beside(teacher: str | os.PathLike) -> Path:
    """The model card JSON that belongs beside a teacher file."""
    return Path(teacher).with_name("model_card.json")


def preprocess_log_in(log_dir: str | os.PathLike, name: str) -> Path:
    """A preprocessing log (a batch's or a scan's) in ``log_dir``."""
    return Path(log_dir) / f"{name}.log"


__all__ = [
    "BIDSIGNORE",
    "SPACE",
    "Layout",
    "ScanFiles",
    "anat_folder",
    "res_label",
    "scan_sources",
    "source_name",
    "source_of_volume",
]
