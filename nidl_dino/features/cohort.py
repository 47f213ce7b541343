"""The cohort table: every input scan joined with participants.tsv and its feature table.

Rows are streamed: the table is built and written a chunk of scans at a time, so memory follows
the chunk, not the cohort (10,000 one-row tables read into one pandas frame each, then
concatenated, peaked at 7.6 GB). This module imports no torch: the ``cohort`` rule runs in
``envs/tables.yaml``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nidl_dino.atomic import atomic_path

#: Prefix of the feature columns (``feature_0000`` ...).
FEATURE_PREFIX = "feature_"


def feature_columns(dim: int) -> list[str]:
    """``feature_0000`` ... ``feature_{dim-1}`` (at least 4 digits)."""
    width = max(4, len(str(dim - 1)))
    return [f"{FEATURE_PREFIX}{i:0{width}d}" for i in range(dim)]


def read_manifest_tables(path: str | os.PathLike) -> list[str]:
    """File names of the per-scan tables a manifest lists (empty when absent or unreadable)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        return list(pd.read_csv(path, sep="\t")["table"].dropna().astype(str))
    except (ValueError, KeyError, pd.errors.ParserError):
        return []


#: QC measures copied into the cohort table as covariates (from ``metrics.<name>`` of qc.tsv).
COHORT_QC_COLUMNS = ("etiv_ml",)
#: Scans per chunk when the cohort table is streamed.
CHUNK_ROWS = 256
_ID_COLUMNS = ["participant_id", "session_id"]
_TABLE_IDS = ("participant_id", "session_id", "scan_id")


def _scan_key(path: str | os.PathLike) -> str:
    return Path(path).name.removesuffix(".tsv")


def _read_feature_row(path: Path) -> tuple[list[str], list[str]]:
    """Header and the one data row of a per-scan feature table."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if len(rows) != 2:
        raise ValueError(f"{path}: a per-scan feature table has a header and one row")
    return rows[0], rows[1]


def _base_table(
    qc: pd.DataFrame, participants: pd.DataFrame | None, sessions: pd.DataFrame | None
) -> pd.DataFrame:
    from nidl_dino.workflow.participants import merge_participants

    base = qc[_ID_COLUMNS + ["scan_id", "status", "reason"]].copy()
    base["session_id"] = base["session_id"].fillna("").astype(str)
    # Head size (FreeSurfer-style eTIV from the registration), the covariate users expect next
    # to the phenotypes; empty for scans excluded before registration.
    covariates = {c: qc[q] for c in COHORT_QC_COLUMNS for q in (f"metrics.{c}", c) if q in qc}
    for column, values in covariates.items():
        base[column] = values.to_numpy()
    if participants is not None:
        base = merge_participants(base, participants, sessions)
        base = base[[c for c in base.columns if c not in covariates] + list(covariates)]
    return base.reset_index(drop=True)


def iter_cohort_chunks(
    qc: pd.DataFrame,
    feature_tables: Sequence[str | os.PathLike],
    participants: pd.DataFrame | None = None,
    sessions: pd.DataFrame | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """The cohort table (see :func:`cohort_table`), ``chunk_rows`` scans at a time.

    Raises:
        ValueError: two feature tables for one scan, or tables with different columns.
    """
    base = _base_table(qc, participants, sessions)
    tables = {_scan_key(p): Path(p) for p in feature_tables}
    if len(tables) != len(feature_tables):
        keys = [_scan_key(p) for p in feature_tables]
        raise ValueError(
            f"two feature tables for one scan: {sorted({k for k in keys if keys.count(k) > 1})[:3]}"
        )
    header: list[str] | None = None
    for start in range(0, max(len(base), 1), chunk_rows):
        chunk = base.iloc[start : start + chunk_rows].reset_index(drop=True)
        if not tables:
            yield chunk
            continue
        model_ids: list[Any] = []
        values = None
        for i, scan in enumerate(chunk["scan_id"]):
            path = tables.get(scan)
            if path is None:
                model_ids.append(None)
                continue
            names, row = _read_feature_row(path)
            features = [n for n in names if n.startswith(FEATURE_PREFIX)]
            if header is None:
                header = features
            elif features != header:
                raise ValueError(f"{path}: its feature columns differ from the other tables'")
            if values is None:
                values = np.full((len(chunk), len(header)), np.nan)
            cells = dict(zip(names, row, strict=True))
            model_ids.append(cells.get("model_id") or None)
            values[i] = np.asarray([cells[n] for n in header], dtype=np.float64)
        if header is None:  # no scan of the first chunks has features yet: columns unknown
            header = _read_feature_row(next(iter(tables.values())))[0]
            header = [n for n in header if n.startswith(FEATURE_PREFIX)]
        if values is None:
            values = np.full((len(chunk), len(header)), np.nan)
        chunk["model_id"] = pd.Series(model_ids, dtype=object)
        yield pd.concat([chunk, pd.DataFrame(values, columns=header)], axis=1)


def cohort_table(
    qc: pd.DataFrame,
    feature_tables: Sequence[str | os.PathLike],
    participants: pd.DataFrame | None = None,
    sessions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per input scan: ids, status, reason, participants.tsv columns, eTIV, features.

    The QC covariates :data:`COHORT_QC_COLUMNS` (``etiv_ml``) come after the participants columns,
    before ``model_id`` and the features, when the QC table has them. Every join is on ``scan_id`` (the QC table's, and a per-scan table's file name
    ``<scan_id>.tsv``), never on (participant_id, session_id), which several runs of one session
    share. In memory: for large cohorts :func:`write_cohort` streams the same rows to disk.

    Args:
        qc: the QC table (``participant_id``, ``session_id``, ``scan_id``, ``status``,
            ``reason``, ...).
        feature_tables: per-scan feature TSVs written by
            :func:`nidl_dino.features.extract.write_subject_tables`.
        participants: the participants table (``participant_id`` plus phenotypes), or None.
        sessions: the sessions.tsv rows (``participant_id``, ``session_id``, ...), or None.

    Returns:
        The cohort table, in QC-table order; ``model_id`` and the features are empty (NaN) for
        scans without a feature table (excluded scans).
    """
    return pd.concat(
        list(iter_cohort_chunks(qc, feature_tables, participants, sessions)), ignore_index=True
    )


def write_cohort(
    chunks: Iterator[pd.DataFrame], out_tsv: str | os.PathLike, out_parquet: str | os.PathLike
) -> int:
    """Stream cohort chunks into a TSV and a Parquet file (each renamed into place at the end).

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_tsv, out_parquet = Path(out_tsv), Path(out_parquet)
    for path in (out_tsv, out_parquet):
        path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    schema = None
    rows = 0
    with atomic_path(out_tsv) as tmp_tsv, atomic_path(out_parquet) as tmp_parquet:
        try:
            with open(tmp_tsv, "w", encoding="utf-8", newline="") as tsv:
                for chunk in chunks:
                    chunk.to_csv(tsv, sep="\t", index=False, header=rows == 0, na_rep="n/a")
                    if schema is None:
                        schema = _arrow_schema(chunk)
                        writer = pq.ParquetWriter(tmp_parquet, schema)
                    table = pa.Table.from_pandas(chunk, schema=schema, preserve_index=False)
                    writer.write_table(table)
                    rows += len(chunk)
        finally:
            if writer is not None:
                writer.close()
    return rows


def _arrow_schema(chunk: pd.DataFrame):
    """Column types fixed from the first chunk: ids and text as strings, features as float64."""
    import pyarrow as pa

    fields = []
    for name in chunk.columns:
        if name.startswith(FEATURE_PREFIX):
            fields.append(pa.field(name, pa.float64()))
        elif pd.api.types.is_bool_dtype(chunk[name]):
            fields.append(pa.field(name, pa.bool_()))
        elif pd.api.types.is_numeric_dtype(chunk[name]):
            fields.append(
                pa.field(
                    name, pa.float64() if pd.api.types.is_float_dtype(chunk[name]) else pa.int64()
                )
            )
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def build_cohort(
    manifest_path: str | os.PathLike,
    qc_path: str | os.PathLike,
    inputs_config: Mapping[str, Any],
    out_tsv: str | os.PathLike,
    out_parquet: str | os.PathLike,
) -> int:
    """Write ``features/cohort.tsv`` and ``.parquet``: one row per input scan, streamed.

    Columns: participant_id, session_id, scan_id, status, reason, the participants.tsv (and
    sessions.tsv) columns, model_id and the features (empty for excluded scans).

    Returns:
        The number of rows (input scans).
    """
    from nidl_dino.workflow.inputs import participants_tsv_path
    from nidl_dino.workflow.participants import read_participants, read_sessions
    from nidl_dino.workflow.tables import read_qc_table

    qc = read_qc_table(qc_path)
    manifest = pd.read_csv(manifest_path, sep="\t", dtype=str, keep_default_na=False)
    tables = [Path(manifest_path).parent / name for name in manifest["table"]]
    participants_file = participants_tsv_path(
        {"bids_dir": inputs_config.get("bids_dir"), **(inputs_config.get("inputs") or {})}
    )
    participants = read_participants(participants_file) if participants_file else None
    sessions = None
    bids_dir = inputs_config.get("bids_dir")
    if participants is not None and bids_dir:
        sessions = read_sessions(bids_dir, participants["participant_id"])
        sessions = sessions if len(sessions) else None
    chunks = iter_cohort_chunks(qc, tables, participants, sessions)
    return write_cohort(chunks, out_tsv, out_parquet)
