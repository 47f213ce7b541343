"""Tables of the workflow: atomic TSV/Parquet writing and the QC table from QC records."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from nidl_dino.atomic import atomic_path
from nidl_dino.workflow.layout import Layout

#: Leading columns of qc/qc.tsv, in this order (INTERFACE.md).
QC_LEADING_COLUMNS = ["participant_id", "session_id", "status", "reason"]


def write_table_atomic(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a TSV (or Parquet, by suffix) under a temporary name, then rename it into place.

    A job killed mid-write leaves a hidden temporary file, never a truncated table under the
    final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def qc_table(records: Iterable[dict]) -> pd.DataFrame:
    """One row per scan from QC records: ids, status, reason, then the scalar QC measures.

    Nested entries are flattened with dotted names; lists are kept as JSON text; the record of
    applied steps (``steps``) is left to the JSON files.
    """
    rows = []
    for record in records:
        record = {k: v for k, v in record.items() if k != "steps"}
        rows.append(_flatten(record))
    table = pd.DataFrame(rows)
    for column in QC_LEADING_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    for column in ("session_id", "reason"):  # text, empty when missing (any dtype pandas chose)
        table[column] = ["" if pd.isna(v) else str(v) for v in table[column]]
    rest = [c for c in table.columns if c not in QC_LEADING_COLUMNS]
    return table[QC_LEADING_COLUMNS + rest]


def read_qc_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read qc/qc.tsv with ids and reasons as strings (empty, not NaN)."""
    table = pd.read_csv(
        path,
        sep="\t",
        dtype={"participant_id": str, "session_id": str, "reason": str},
        keep_default_na=False,
        na_values=["n/a"],
    )
    for column in ("session_id", "reason"):
        table[column] = table[column].fillna("").astype(str)
    return table


def ok_scans(qc: pd.DataFrame) -> pd.DataFrame:
    """Rows of the QC table whose status is ``ok``, in table order."""
    return qc[qc["status"] == "ok"].reset_index(drop=True)


def ok_volumes(qc: pd.DataFrame, layout: Layout) -> list[str]:
    """Preprocessed volumes of the scans that passed QC, in QC-table order."""
    return [str(layout.scan(s).volume) for s in ok_scans(qc)["scan_id"]]
