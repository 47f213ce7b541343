"""The cohort table: every input scan joined with participants.tsv and its feature table.

This module imports no torch: the ``cohort`` rule runs in ``envs/tables.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nidl_dino.tables import write_table_atomic

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


def cohort_table(
    qc: pd.DataFrame,
    feature_tables: Sequence[str | os.PathLike],
    participants: pd.DataFrame | None = None,
    sessions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per input scan: ids, status, reason, participants.tsv columns, features.

    Every join is on ``scan_id`` (the QC table's and the feature tables' file names), never on
    (participant_id, session_id), which several runs of one session share.

    Args:
        qc: the QC table (``participant_id``, ``session_id``, ``scan_id``, ``status``,
            ``reason``, ...).
        feature_tables: per-scan feature TSVs written by :func:`write_subject_tables`.
        participants: the participants table (``participant_id`` plus phenotypes), or None.
        sessions: the sessions.tsv rows (``participant_id``, ``session_id``, ...), or None.

    Returns:
        The cohort table, in QC-table order; features are empty (NaN) for excluded scans.
    """
    from nidl_dino.participants import merge_participants

    ids = ["participant_id", "session_id"]
    base = qc[ids + ["scan_id", "status", "reason"]].copy()
    base["session_id"] = base["session_id"].fillna("").astype(str)
    if participants is not None:
        base = merge_participants(base, participants, sessions)
    # One key per scan: a per-scan table is <scan_id>.tsv, so several runs of one session (or
    # any two scans sharing participant and session) never multiply rows.
    frames = [
        pd.read_csv(p, sep="\t", dtype={"participant_id": str, "session_id": str})
        .drop(columns=["participant_id", "session_id", "scan_id"], errors="ignore")
        .assign(scan_id=Path(p).name.removesuffix(".tsv"))
        for p in feature_tables
    ]
    if frames:
        feats = pd.concat(frames, ignore_index=True)
        if feats["scan_id"].duplicated().any():
            raise ValueError(
                f"two feature tables for one scan: {feats['scan_id'][feats['scan_id'].duplicated()].tolist()[:3]}"
            )
        base = base.merge(feats, on="scan_id", how="left", validate="one_to_one")
    return base


def build_cohort(
    manifest_path: str | os.PathLike,
    qc_path: str | os.PathLike,
    inputs_config: Mapping[str, Any],
    out_tsv: str | os.PathLike,
    out_parquet: str | os.PathLike,
) -> pd.DataFrame:
    """Write ``features/cohort.tsv`` and ``.parquet``: one row per input scan.

    Columns: participant_id, session_id, status, reason, the participants.tsv (and
    sessions.tsv) columns, model_id and the features (empty for excluded scans).
    """
    from nidl_dino.inputs import participants_tsv_path
    from nidl_dino.participants import read_participants, read_sessions
    from nidl_dino.tables import read_qc_table

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
    table = cohort_table(qc, tables, participants, sessions)
    write_table_atomic(table, out_tsv)
    write_table_atomic(table, out_parquet)
    return table
