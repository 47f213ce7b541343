"""Baseline feature sets that DINO features must beat in the probe table.

- intensity PCA: the preprocessed volumes, block-averaged and flattened; the PCA itself is a step of
  the returned :class:`~nidl_dino.evaluation.probes.FeatureSet`, so it is fitted inside each training fold;
- brain volume: one column of the QC table, as a one-feature model.

The chance baseline is built into :func:`nidl_dino.evaluation.probes.run_probes`, and the random-weights
encoder is an ordinary feature table extracted like the DINO one.

In the workflow the ``extract`` job computes what needs the volumes (the random-weights
features, the block-averaged intensities), on the GPU, in its one pass over them, and writes it
with :func:`write_baseline_table`; the ``probe`` job reads those tables
(:func:`read_baseline_table`) and never decodes a volume.

Example:
    >>> feature_sets = {
    ...     "dino": dino_features,
    ...     "random encoder": random_features,
    ...     "intensity PCA": intensity_pca_features(volume_paths, n_components=32, downsample=8),
    ...     "brain volume": brain_volume_feature(qc),
    ... }
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from sklearn.decomposition import PCA

from nidl_dino.atomic import atomic_path
from nidl_dino.errors import UserError
from nidl_dino.evaluation.probes import FeatureSet


def block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a 3D volume by averaging non-overlapping ``factor``^3 blocks of voxels.

    Hand-written because neither NumPy, SciPy nor scikit-learn has a block mean
    (``scipy.ndimage.zoom`` interpolates instead of averaging, which aliases at large factors).

    Args:
        volume: Array of shape (D, H, W).
        factor: Block edge in voxels; trailing voxels that do not fill a whole block are dropped.

    Returns:
        Array of shape (D // factor, H // factor, W // factor).
    """
    d, h, w = (size // factor for size in volume.shape)
    blocks = volume[: d * factor, : h * factor, : w * factor]
    return blocks.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))


def downsampled_intensities(volume_paths: Sequence[str | Path], downsample: int = 8) -> np.ndarray:
    """Load preprocessed volumes, block-average them and flatten each into one row.

    Args:
        volume_paths: NIfTI files of one shape (the preprocessed, registered volumes), in the row
            order of the cohort table they will be probed against.
        downsample: Block edge in voxels (8 turns a 1 mm 182 x 218 x 182 volume into
            22 x 27 x 22 = 13,068 values). Non-finite voxels count as 0.

    Returns:
        Float32 array of shape (len(volume_paths), n_blocks).

    Raises:
        UserError: An unreadable file, a volume that is not 3D, a shape that differs from the first
            volume's, or a ``downsample`` larger than the volume.
    """
    if int(downsample) < 1:
        raise UserError(f"probes.pca.downsample={downsample}; use a positive integer")
    rows, shape = [], None
    for path in volume_paths:
        try:
            image = nib.load(path)
        except (OSError, ImageFileError) as err:
            raise UserError(f"{path}: cannot read as NIfTI ({err}); check the file") from err
        volume = np.asarray(image.dataobj, dtype=np.float32)
        if volume.ndim == 4 and volume.shape[3] == 1:
            volume = volume[..., 0]
        if volume.ndim != 3:
            raise UserError(f"{path}: volume of shape {volume.shape}; expected a 3D volume")
        if shape is None:
            shape = volume.shape
            if min(shape) < downsample:
                raise UserError(
                    f"{path}: shape {shape} is smaller than probes.pca.downsample={downsample}; "
                    "lower it"
                )
        elif volume.shape != shape:
            raise UserError(
                f"{path}: shape {volume.shape} differs from {shape} of {volume_paths[0]}; "
                "use the preprocessed (registered) volumes"
            )
        volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
        rows.append(block_average(volume, int(downsample)).ravel())
    if not rows:
        raise UserError("intensity PCA baseline: no volumes given; check the preprocessed paths")
    return np.stack(rows)


def intensity_pca_features(
    volume_paths: Sequence[str | Path],
    n_components: int = 32,
    downsample: int = 8,
    seed: int = 0,
) -> FeatureSet:
    """The intensity baseline: downsampled voxels, with a PCA fitted inside each training fold.

    The PCA is returned as a step of the feature set rather than applied here: fitting it on every
    subject would let test rows shape the components (leakage). :func:`~nidl_dino.evaluation.probes.run_probes`
    refits it on each inner and outer training split, then standardises the component scores.

    Args:
        volume_paths: Preprocessed NIfTI files, in the cohort table's row order.
        n_components: Principal components kept; must not exceed the rows of the smallest inner
            training fold (``run_probes`` checks and names the key).
        downsample: Block edge in voxels (see :func:`downsampled_intensities`).
        seed: Seed of the PCA's randomized solver.

    Returns:
        A :class:`~nidl_dino.evaluation.probes.FeatureSet` of shape (len(volume_paths), n_blocks) with one
        ``("pca", PCA)`` step.
    """
    return pca_feature_set(downsampled_intensities(volume_paths, downsample), n_components, seed)


def pca_feature_set(intensities: np.ndarray, n_components: int = 32, seed: int = 0) -> FeatureSet:
    """The intensity baseline from downsampled intensities ``(N, n_blocks)`` already computed
    (e.g. read from the extract job's ``intensities.parquet``); see :func:`intensity_pca_features`.
    """
    if int(n_components) < 1:
        raise UserError(f"probes.pca.n_components={n_components}; use a positive integer")
    X = np.asarray(intensities, dtype=np.float32)
    return FeatureSet(X, steps=(("pca", PCA(n_components=int(n_components), random_state=seed)),))


#: Identity columns of a baseline table, then one ``features`` column (a fixed-size list).
BASELINE_ID_COLUMNS = ("scan_id", "participant_id", "session_id")


def write_baseline_table(
    path: str | os.PathLike,
    scans: pd.DataFrame,
    values: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write one baseline's per-scan vectors as Parquet, atomically.

    Args:
        path: the ``.parquet`` file to write.
        scans: rows aligned with ``values``, with ``scan_id``, ``participant_id``,
            ``session_id``.
        values: float array ``(N, F)``.
        metadata: plain values stored in the file's schema metadata (``nidl_dino`` key): how the
            vectors were made (seed, pooling, downsample).

    Returns:
        The path written. The file holds the id columns and ``features``: one fixed-size list
        of F float32 per scan (10k x 4,096 floats is one 160 MB column, read back in one copy).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != len(scans) or values.shape[1] == 0:
        raise ValueError(f"{len(scans)} scans but values of shape {values.shape}")
    columns = {
        name: pa.array(scans[name].fillna("").astype(str).tolist(), type=pa.string())
        for name in BASELINE_ID_COLUMNS
    }
    flat = pa.array(values.reshape(-1), type=pa.float32())
    columns["features"] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    table = pa.table(columns)
    table = table.replace_schema_metadata(
        {"nidl_dino": json.dumps({"dim": int(values.shape[1]), **dict(metadata or {})})}
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_baseline_table(
    path: str | os.PathLike, scan_ids: Sequence[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """A baseline's vectors for ``scan_ids``, in that order, and the file's metadata.

    Raises:
        UserError: a missing or unreadable file, or a scan without a row (the table is older
            than the cohort: rerun extract).
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the baseline table ({err}); rerun extract") from None
    meta = json.loads((table.schema.metadata or {}).get(b"nidl_dino", b"{}"))
    ids = table.column("scan_id").to_pylist()
    column = table.column("features").combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), dim)
    row_of = {scan: i for i, scan in enumerate(ids)}
    missing = [s for s in scan_ids if s not in row_of]
    if missing:
        raise UserError(
            f"{path}: no row for scan {missing[0]} ({len(missing)} missing); the table is older "
            "than the cohort: rerun extract (snakemake -R extract)"
        )
    return values[[row_of[s] for s in scan_ids]], meta


def brain_volume_feature(qc_table: pd.DataFrame, column: str = "etiv_ml") -> np.ndarray:
    """The brain-volume baseline: one QC measure as a one-feature model.

    Args:
        qc_table: QC rows in the cohort table's row order (filter and order it like the cohort).
        column: QC column holding the brain volume (ml).

    Returns:
        Float array of shape (len(qc_table), 1).

    Raises:
        UserError: The column is absent, not numeric, or missing for some rows.
    """
    if column not in qc_table.columns:
        raise UserError(
            f"QC table: no column '{column}' for the brain-volume baseline; "
            f"set probes.brain_volume_column to one of {list(qc_table.columns)}"
        )
    values = pd.to_numeric(qc_table[column], errors="coerce")
    missing = values.isna().to_numpy()
    if missing.any():
        raise UserError(
            f"QC table: column '{column}' is missing or not numeric in {missing.sum()} row(s) "
            f"(e.g. row {qc_table.index[missing.argmax()]!r}); drop those scans before probing"
        )
    return values.to_numpy(dtype=float).reshape(-1, 1)


#: Bins of the brain-intensity histogram the extract job writes (over the normalised [0, 1]).
HISTOGRAM_BINS = 128
#: Columns of :func:`tissue_class_features`: CSF, grey and white matter by increasing T1w mean.
TISSUE_COLUMNS = ("csf_fraction", "gm_fraction", "wm_fraction", "csf_mean", "gm_mean", "wm_mean")


def template_brain(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The registered template's brain (MNI152 above nilearn's brain threshold) on a grid."""
    from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_on_grid

    return template_on_grid(tuple(int(s) for s in shape), np.asarray(affine)) > BRAIN_THRESHOLD


def intensity_histogram_features(histograms: np.ndarray, bins: int = 32) -> np.ndarray:
    """The intensity-histogram baseline: the fraction of brain voxels in ``bins`` equal bins.

    Ageing shifts the brain's intensity distribution (more CSF, less grey/white contrast), which
    a histogram of the registered, normalised brain captures without any spatial model: a strong
    age baseline for image features to beat.

    Args:
        histograms: (N, B) fractions of brain voxels in B equal bins over [0, 1] (the extract
            job's ``brain_histogram`` table), B a multiple of ``bins``.
        bins: bins of the baseline (neighbouring bins are summed).

    Returns:
        Float array (N, bins), rows summing to 1.
    """
    n, fine = histograms.shape
    if fine % int(bins):
        raise ValueError(f"{fine} histogram bins cannot be grouped into {bins}")
    return histograms.reshape(n, int(bins), fine // int(bins)).sum(axis=2)


def tissue_class_features(histograms: np.ndarray, iterations: int = 200) -> np.ndarray:
    """The tissue-class baseline: a 3-class Gaussian mixture of each brain's intensities.

    The classes, ordered by mean T1w intensity, are CSF, grey and white matter; the features are
    their fractions of the template brain (the mixture weights, tissue volumes relative to the
    brain) and their mean intensities (grey/white contrast). The mixture is fitted by EM on the
    brain's intensity histogram, each bin centre weighted by its fraction of voxels: written by
    hand because scikit-learn's GaussianMixture takes no sample weights, and the histogram is
    what the extract job keeps of each volume.

    Args:
        histograms: (N, B) fractions of brain voxels in B equal bins over [0, 1].
        iterations: EM iterations (from the 15th, 50th and 85th percentiles).

    Returns:
        Float array (N, 6), columns :data:`TISSUE_COLUMNS`.
    """
    n, bins = histograms.shape
    x = (np.arange(bins) + 0.5) / bins
    floor = (1.0 / bins) ** 2 / 12  # a class never narrower than one bin
    rows = []
    for weights in np.asarray(histograms, dtype=float):
        weights = weights / max(weights.sum(), 1e-12)
        cdf = np.cumsum(weights)
        mean = x[np.searchsorted(cdf, [0.15, 0.5, 0.85]).clip(0, bins - 1)].astype(float)
        var = np.full(3, 0.01)
        prior = np.full(3, 1 / 3)
        for _ in range(iterations):
            log_p = (
                np.log(prior) - 0.5 * np.log(2 * np.pi * var) - (x[:, None] - mean) ** 2 / (2 * var)
            )
            log_p -= log_p.max(axis=1, keepdims=True)
            resp = np.exp(log_p)
            resp /= resp.sum(axis=1, keepdims=True)
            mass = (weights[:, None] * resp).sum(axis=0) + 1e-12
            prior = mass / mass.sum()
            mean = (weights[:, None] * resp * x[:, None]).sum(axis=0) / mass
            var = (weights[:, None] * resp * (x[:, None] - mean) ** 2).sum(axis=0) / mass + floor
        order = np.argsort(mean)
        rows.append([*prior[order], *mean[order]])
    return np.asarray(rows, dtype=float).reshape(n, len(TISSUE_COLUMNS))
