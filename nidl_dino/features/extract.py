"""Extracting the teacher's features and writing the per-scan feature tables.

A feature vector comes from the teacher backbone (no projection head) run on the whole preprocessed
volume (1, D, H, W) in eval mode (BatchNorm running statistics), one vector per scan. With
``extract.pooling: stages_mean_std`` (default) it joins the spatial standard deviations and means
of every stage of the backbone, with ``stages`` the means only
(:class:`~nidl_dino.encoders.readout.StagePooling`; the backbone's own output is the last part of both);
with ``last`` it is the backbone's output alone (``output_dim`` floats). The teacher comes from
its file (:mod:`nidl_dino.features.teacher`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nidl_dino.errors import UserError
from nidl_dino.features.cohort import feature_columns, read_manifest_tables
from nidl_dino.features.teacher import load_teacher, random_encoder_like
from nidl_dino.settings import with_defaults
from nidl_dino.workflow.layout import (
    EXTRACTION_STATE,
    Layout,
    baseline_table_name,
    feature_table_name,
)
from nidl_dino.workflow.tables import write_table_atomic

log = logging.getLogger(__name__)


def extract_features(
    encoder: nn.Module,
    volume_paths: Sequence[str],
    batch_size: int = 4,
    num_workers: int = 0,
    accelerator: str = "auto",
    precision: str | int | None = "32-true",
) -> np.ndarray:
    """Encode each volume with ``encoder`` (eval mode, no gradient), in the given order.

    Runs with Lightning Fabric on one device, so ``accelerator``/``precision`` mean what they
    mean for training.

    Returns:
        float32 array (N, output_dim).
    """
    sets = extract_feature_sets(
        {"features": encoder},
        volume_paths,
        batch_size=batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        precision=precision,
    )
    return sets["features"]


def extract_feature_sets(
    encoders: Mapping[str, nn.Module],
    volume_paths: Sequence[str],
    batch_size: int = 4,
    num_workers: int = 0,
    accelerator: str = "auto",
    precision: str | int | None = "32-true",
    downsample: int | None = None,
    histogram_bins: int | None = None,
) -> dict[str, np.ndarray]:
    """Every encoder's features of each volume, from one pass of the loader over the volumes.

    Each volume is decoded once and moved to the device once, whatever the number of encoders
    (the DINO teacher and the random-weights baseline share the loader and the readout).

    Args:
        encoders: name -> encoder returning ``(B, F)`` for ``(B, 1, D, H, W)``.
        volume_paths: preprocessed volumes (one shape when ``batch_size > 1``).
        batch_size: volumes per batch.
        num_workers: loader worker processes.
        accelerator: Lightning accelerator (Fabric, one device).
        precision: Lightning precision of the encoders.
        downsample: also return ``"intensities"``: each volume block-averaged over
            ``downsample``^3 voxels and flattened (the intensity-PCA baseline's input, as
            :func:`nidl_dino.evaluation.baselines.downsampled_intensities` computes it; non-finite voxels
            count as 0), computed in float32 on the device.
        histogram_bins: also return ``"brain_histogram"``: the fraction of the voxels inside
            the registered template brain (:func:`nidl_dino.evaluation.baselines.template_brain`, on the
            first volume's grid) in each of ``histogram_bins`` equal bins over [0, 1] (values
            outside go to the end bins), computed on the device.

    Returns:
        name -> float32 array ``(N, F)``, in the order of ``volume_paths``.

    Raises:
        UserError: a volume smaller than ``downsample``, or an unreadable/missing volume.
    """
    from lightning_fabric import Fabric

    from nidl_dino.training.data import volume_loader

    if not volume_paths:
        out = {
            k: np.zeros((0, int(getattr(e, "output_dim", 0))), dtype=np.float32)
            for k, e in encoders.items()
        }
        if downsample:
            out["intensities"] = np.zeros((0, 0), dtype=np.float32)
        if histogram_bins:
            out["brain_histogram"] = np.zeros((0, int(histogram_bins)), dtype=np.float32)
        return out
    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    models = {}
    for name, encoder in encoders.items():
        models[name] = fabric.setup_module(encoder)
        models[name].eval()
    loader = fabric.setup_dataloaders(
        volume_loader(list(volume_paths), batch_size=batch_size, num_workers=num_workers),
        use_distributed_sampler=False,
    )
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    if downsample:
        chunks["intensities"] = []
    brain = None
    if histogram_bins:
        import nibabel as nib

        from nidl_dino.evaluation.baselines import template_brain

        first = nib.load(volume_paths[0])
        brain = torch.as_tensor(template_brain(first.shape[:3], first.affine))
        chunks["brain_histogram"] = []
    done, start = 0, time.perf_counter()
    report_every = max(1, len(loader) // 10)  # about ten progress lines per extraction
    with torch.inference_mode():
        for i, batch in enumerate(loader, start=1):
            x = batch["image"] if isinstance(batch, dict) else batch
            if isinstance(x, (list, tuple)):
                x = x[0]
            for name, model in models.items():
                chunks[name].append(model(x).float().cpu())
            if downsample:
                chunks["intensities"].append(_block_average(x, int(downsample), volume_paths[0]))
            if brain is not None:
                brain = brain.to(x.device)
                chunks["brain_histogram"].append(_brain_histogram(x, brain, int(histogram_bins)))
            done += len(x)
            if i % report_every == 0 or i == len(loader):
                rate = done / max(time.perf_counter() - start, 1e-9)
                log.info("features: %d of %d scans (%.1f scans/s)", done, len(volume_paths), rate)
    return {name: torch.cat(parts).numpy() for name, parts in chunks.items()}


def _brain_histogram(x: torch.Tensor, brain: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, bins) fractions of each volume's brain voxels per equal bin of [0, 1], float32."""
    if tuple(x.shape[-3:]) != tuple(brain.shape):
        raise UserError(
            f"volumes of shape {tuple(x.shape[-3:])} and {tuple(brain.shape)} in one extraction: "
            "use the preprocessed (registered) volumes"
        )
    values = x.float().flatten(1)[:, brain.flatten()].clamp(0.0, 1.0)
    index = (values * bins).long().clamp(max=bins - 1)
    counts = torch.zeros(len(x), bins, device=x.device).scatter_add_(
        1, index, torch.ones_like(values)
    )
    return (counts / values.shape[1]).cpu()


def _block_average(x: torch.Tensor, factor: int, first_path: str) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, C * d * h * w)``: means of ``factor``^3 blocks (trailing
    voxels dropped), in float32 outside autocast, on the host."""
    if min(x.shape[2:]) < factor:
        raise UserError(
            f"{first_path}: shape {tuple(x.shape[2:])} is smaller than "
            f"probes.pca.downsample={factor}; lower it"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        clean = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        pooled = torch.nn.functional.avg_pool3d(clean, kernel_size=factor, stride=factor)
    return pooled.flatten(1).cpu()


def write_subject_tables(
    features: np.ndarray,
    scans: pd.DataFrame,
    out_dir: str | os.PathLike,
    model_id: str,
) -> list[Path]:
    """One TSV per scan: ``participant_id``, ``session_id``, ``model_id``, ``scan_id``, features.

    ``scans`` rows are aligned with ``features`` rows and hold ``scan_id``, ``participant_id``
    and ``session_id``. Files are named ``<scan_id>.tsv`` (:mod:`nidl_dino.workflow.layout`) and
    written atomically.
    """
    if len(scans) != len(features):
        raise ValueError(f"{len(scans)} scans but {len(features)} feature rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = feature_columns(features.shape[1])
    written = []
    for row, vector in zip(scans.itertuples(index=False), features, strict=True):
        table = pd.DataFrame([vector], columns=columns)
        table.insert(0, "scan_id", row.scan_id)
        table.insert(0, "model_id", model_id)
        table.insert(0, "session_id", "" if pd.isna(row.session_id) else row.session_id)
        table.insert(0, "participant_id", row.participant_id)
        path = out_dir / feature_table_name(row.scan_id)
        write_table_atomic(table, path)
        written.append(path)
    return written


def extract_cohort(
    teacher_path: str | os.PathLike,
    qc: pd.DataFrame,
    layout: Layout,
    manifest_path: str | os.PathLike,
    config: Mapping[str, Any],
    baselines_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Extract features of every scan that passed QC and write one table per scan.

    One model load and batched inference for the whole cohort; the tables go next to
    ``manifest_path`` (``<scan_id>.tsv``). With ``baselines_dir``, the same pass over the volumes
    (same loader, device and readout) also writes the baselines' inputs that the probes only
    read (:mod:`nidl_dino.evaluation.baselines`): ``random_encoder.parquet``, the features of the teacher's
    architecture with DINO's initial weights (``encoder_seed``), and ``intensities.parquet``,
    the volumes block-averaged over ``pca_downsample``^3 voxels.
    The manifest (scan_id, participant_id, session_id,
    table) is written last, so a run killed before the end leaves no manifest and is redone.
    Tables listed in a previous manifest but no longer produced (a scan now excluded) are
    removed, so no stale features survive.

    Args:
        teacher_path: file written by :func:`save_teacher`.
        qc: the QC table (scan_id, participant_id, session_id, status, ...).
        layout: where the preprocessed volumes are (:meth:`nidl_dino.workflow.layout.Layout.scan`).
        manifest_path: the manifest to write.
        config: the run's config, or the part of it that extraction reads (same shape as
            config.yaml, missing keys take the schema's defaults): ``extract`` (batch_size,
            num_workers, pooling, precision), ``trainer.accelerator``, ``seed`` (the random
            baseline's weights) and ``probes.pca.downsample``. Extraction runs in
            ``extract.precision``, float32 (``"32-true"``) unless asked otherwise, whatever
            precision training used. ``num_workers: auto`` is ``threads``.
        baselines_dir: folder of the baseline tables (None: no baselines).
        threads: the job's CPUs (for ``num_workers: auto``).

    Returns:
        The manifest.
    """
    from nidl_dino.encoders.readout import feature_encoder
    from nidl_dino.training.data import resolve_num_workers
    from nidl_dino.workflow.tables import ok_scans

    out_dir = Path(manifest_path).parent
    # Snakemake deletes a job's declared outputs before it runs: what earlier runs extracted is
    # read from a copy of the manifest that is not declared (EXTRACTION_STATE).
    state_path = out_dir / EXTRACTION_STATE
    previous = read_manifest_tables(manifest_path) + read_manifest_tables(state_path)
    scans = ok_scans(qc)
    from nidl_dino.training.devices import check_gpu

    config = with_defaults(config)
    accelerator = str(config["trainer"]["accelerator"])
    check_gpu(accelerator)  # no silent CPU fallback
    encoder, info = load_teacher(teacher_path)
    extract = config["extract"]
    pooling = str(extract["pooling"])
    precision = str(extract["precision"])
    # A scan's table is kept when the same model, readout and precision made it from the same
    # preprocessing (its signature file): a grown study extracts only its new scans.
    files = [layout.scan(s) for s in scans["scan_id"]]
    signatures = [preprocessing_signature(f.signature) for f in files]
    keys = [(info["model_id"], pooling, precision, sig) for sig in signatures]
    done = _extraction_keys(state_path)
    todo = [
        i
        for i, (scan, key) in enumerate(zip(scans["scan_id"], keys, strict=True))
        if not key[3] or done.get(scan) != key or not (out_dir / feature_table_name(scan)).is_file()
    ]
    log.info(
        "features: %d scan(s) to write, %d unchanged (same model, readout and preprocessing)",
        len(todo),
        len(scans) - len(todo),
    )
    new = scans.iloc[todo].reset_index(drop=True)
    encoders = {"dino": feature_encoder(encoder, pooling)}
    encoder_seed = int(config["seed"])
    downsample = None
    if baselines_dir is not None:
        # read out like the DINO features (extract.pooling): only the weights differ
        encoders["random_encoder"] = feature_encoder(
            random_encoder_like(info, seed=encoder_seed), pooling
        )
        downsample = int(config["probes"]["pca"]["downsample"])
        from nidl_dino.evaluation.baselines import HISTOGRAM_BINS
    try:
        num_workers = resolve_num_workers(extract["num_workers"], threads)
    except UserError as err:
        raise UserError(f"extract.{err}") from None
    sets = extract_feature_sets(
        encoders,
        [str(f.volume) for f in files],
        batch_size=int(extract["batch_size"]),
        num_workers=num_workers,
        accelerator=accelerator,
        precision=precision,
        downsample=downsample,
        histogram_bins=HISTOGRAM_BINS if baselines_dir is not None else None,
    )
    features = sets["dino"]
    if not np.isfinite(features).all():
        raise UserError(
            f"the teacher in {teacher_path} produced non-finite features: training diverged; "
            "lower dino.learning_rate or set dino.clip_grad and re-train"
        )
    if baselines_dir is not None:
        from nidl_dino.evaluation.baselines import write_baseline_table

        write_baseline_table(
            Path(baselines_dir) / baseline_table_name("random_encoder"),
            scans,
            sets["random_encoder"],
            {"encoder_seed": encoder_seed, "pooling": pooling, "teacher": info["model_id"]},
        )
        write_baseline_table(
            Path(baselines_dir) / baseline_table_name("intensities"),
            scans,
            sets["intensities"],
            {"downsample": downsample},
        )
        write_baseline_table(
            Path(baselines_dir) / baseline_table_name("brain_histogram"),
            scans,
            sets["brain_histogram"],
            {"bins": HISTOGRAM_BINS, "range": [0.0, 1.0], "region": "template brain"},
        )
    # every scan's features were computed (the baselines need a pass over every volume), but
    # only the new or changed scans' tables are written: the others stay byte-identical
    write_subject_tables(features[todo], new, out_dir, info["model_id"])
    manifest = scans[["scan_id", "participant_id", "session_id"]].copy()
    manifest["table"] = [feature_table_name(s) for s in scans["scan_id"]]
    manifest["model_id"] = info["model_id"]
    manifest["pooling"] = pooling
    manifest["precision"] = precision
    manifest["preproc_signature"] = signatures
    for name in set(previous) - set(manifest["table"]):
        (out_dir / name).unlink(missing_ok=True)
    write_table_atomic(manifest, manifest_path)
    write_table_atomic(manifest, state_path)
    return manifest


def preprocessing_signature(path: str | os.PathLike) -> str:
    """Hash of a scan's preprocessing signature file (:attr:`nidl_dino.workflow.layout.ScanFiles.signature`:
    its input file and configuration); '' if there is none."""
    try:
        text = Path(path).read_bytes()
    except OSError:
        return ""
    return hashlib.sha256(text).hexdigest()[:16]


def _extraction_keys(manifest_path: str | os.PathLike) -> dict[str, tuple[str, str, str, str]]:
    """scan_id -> (model_id, pooling, precision, preproc_signature) of a previous manifest."""
    columns = ["scan_id", "model_id", "pooling", "precision", "preproc_signature"]
    try:
        table = pd.read_csv(manifest_path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    if any(c not in table.columns for c in columns):
        return {}  # written before signatures were recorded: extract everything again
    return {row[0]: tuple(row[1:]) for row in table[columns].itertuples(index=False)}
