"""``output_dir`` as a BIDS-derivatives dataset: ``dataset_description.json`` and ``.bidsignore``.

BIDS 1.10, "Derivatives": a derivatives dataset has a ``dataset_description.json`` with ``Name``
and ``BIDSVersion`` (required), ``DatasetType: "derivative"``, ``GeneratedBy`` (required for
derivatives: a list of objects, each with a ``Name`` and optionally ``Version``,
``CodeURL``...) and ``SourceDatasets`` (recommended: objects with ``URL``, ``DOI``,
``Version``). The preprocessed files carry BIDS-derivatives names (:mod:`nidl_dino.workflow.layout`);
our own folders, which hold no BIDS-named files (qc, features, model, probes, report, logs,
caches, the per-batch tables), and the files beside the preprocessed ones that are not BIDS
files are listed in ``.bidsignore`` (:data:`nidl_dino.workflow.layout.BIDSIGNORE`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nidl_dino.atomic import write_text_atomic
from nidl_dino.workflow import layout

#: BIDS version the description declares.
BIDS_VERSION = "1.10.0"
#: What a BIDS validator should not look into (the layout's list).
BIDSIGNORE = layout.BIDSIGNORE


def git_commit(folder: str | os.PathLike) -> str | None:
    """The commit checked out in ``folder`` (with ``-dirty`` for local changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if commit and dirty else commit or None


def generated_by(code_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``GeneratedBy`` entry of this workflow: name, version, and the git commit if any."""
    from nidl_dino import __version__

    entry: dict[str, Any] = {
        "Name": "nidl-dino",
        "Version": __version__,
        "Description": "Brain MRI preprocessing and DINO self-supervised features (Snakemake)",
    }
    commit = git_commit(code_dir) if code_dir else None
    if commit:
        # BIDS has no commit key in GeneratedBy: the version carries it (PEP 440 local part)
        # and the description the full hash
        entry["Version"] = f"{__version__}+g{commit[:12]}"
        entry["Description"] += f", git commit {commit}"
    return entry


def source_datasets(bids_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    """``SourceDatasets``: the input BIDS dataset by URL (``file://``), with its DOI if it has one."""
    if not bids_dir:
        return []
    root = Path(bids_dir).resolve()
    entry: dict[str, Any] = {"URL": root.as_uri()}
    try:
        description = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        description = {}
    if isinstance(description, Mapping):
        if description.get("DatasetDOI"):
            entry["DOI"] = str(description["DatasetDOI"])
        if description.get("DatasetVersion") or description.get("Version"):
            entry["Version"] = str(description.get("DatasetVersion") or description["Version"])
    return [entry]


def dataset_description(
    bids_dir: str | os.PathLike | None,
    generated: Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The derivatives ``dataset_description.json`` content (plain JSON values)."""
    description: dict[str, Any] = {
        "Name": "nidl-dino derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [dict(generated)],
        "SourceDatasets": source_datasets(bids_dir),
    }
    if model:
        description["GeneratedBy"][0]["Model"] = dict(model)  # extra field: teacher used
    return description


def write_derivatives_files(
    output_dir: str | os.PathLike,
    description: Mapping[str, Any],
    description_path: str | os.PathLike | None = None,
    bidsignore_path: str | os.PathLike | None = None,
) -> None:
    """Write ``dataset_description.json`` and ``.bidsignore`` (atomically), by default where
    the layout of ``output_dir`` puts them."""
    out = layout.Layout(output_dir)
    targets = (
        (
            Path(description_path or out.dataset_description),
            json.dumps(description, indent=2) + "\n",
        ),
        (Path(bidsignore_path or out.bidsignore), "\n".join(BIDSIGNORE) + "\n"),
    )
    for path, text in targets:
        write_text_atomic(path, text)
