"""Saving the trained teacher, extracting features, and writing the feature tables.

A feature is the teacher backbone's output (no projection head) for the whole preprocessed
volume (1, D, H, W), in eval mode (BatchNorm running statistics), one vector of ``output_dim``
floats per scan. The teacher file holds only tensors and plain values, and loads with
``torch.load(weights_only=True)``: opening it never executes code from the file. The encoder's
code comes from the installed package (a registry name) or from the import path recorded in it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nidl_dino.errors import UserError
from nidl_dino.tables import write_table_atomic

TEACHER_FORMAT = "nidl-dino-teacher/1"
FEATURE_PREFIX = "feature_"


def feature_columns(dim: int) -> list[str]:
    """``feature_0000`` ... ``feature_{dim-1}`` (at least 4 digits)."""
    width = max(4, len(str(dim - 1)))
    return [f"{FEATURE_PREFIX}{i:0{width}d}" for i in range(dim)]


def save_teacher(
    teacher: nn.Module,
    encoder_spec: Any,
    path: str | os.PathLike,
    image_size: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Save the teacher backbone with what is needed to rebuild it; return its model id.

    The model id is ``dino-<encoder name>-<first 12 hex digits of the weights' SHA-256>``, so a
    feature table says exactly which weights produced it.
    """
    state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    spec = _plain_spec(encoder_spec)
    name = str(spec["name"]).replace(":", ".").split(".")[-1]
    model_id = f"dino-{name}-{digest.hexdigest()[:12]}"
    payload = {
        "format": TEACHER_FORMAT,
        "model_id": model_id,
        "encoder": spec,
        "image_size": image_size,
        "output_dim": int(getattr(teacher, "output_dim", 0) or 0),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return model_id


def load_teacher(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a teacher saved by :func:`save_teacher`, weights-only.

    Returns:
        ``(encoder, info)``: the encoder in eval mode, and the file's metadata (model_id,
        encoder spec, output_dim, ...).

    Raises:
        UserError: a missing, unreadable or foreign file.
    """
    from nidl_dino.encoders import build_encoder

    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file {path} does not exist: run the train rule first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        reason = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{path} is not a loadable nidl-dino teacher file ({reason}): re-run training"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise UserError(f"{path} is not a nidl-dino teacher file: re-run training")
    encoder = build_encoder(payload["encoder"], in_channels=1, image_size=None)
    encoder.load_state_dict(payload["state_dict"])
    encoder.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return encoder, info


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
    from lightning_fabric import Fabric

    from nidl_dino.data import volume_loader

    if not volume_paths:
        dim = int(getattr(encoder, "output_dim", 0))
        return np.zeros((0, dim), dtype=np.float32)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    model = fabric.setup_module(encoder)
    model.eval()
    loader = fabric.setup_dataloaders(
        volume_loader(list(volume_paths), batch_size=batch_size, num_workers=num_workers),
        use_distributed_sampler=False,
    )
    chunks = []
    with torch.inference_mode():
        for batch in loader:
            x = batch["image"] if isinstance(batch, dict) else batch
            if isinstance(x, (list, tuple)):
                x = x[0]
            chunks.append(model(x).float().cpu())
    return torch.cat(chunks).numpy()


def write_subject_tables(
    features: np.ndarray,
    scans: pd.DataFrame,
    out_dir: str | os.PathLike,
    model_id: str,
) -> list[Path]:
    """One TSV per scan: ``participant_id``, ``session_id``, ``model_id``, feature columns.

    ``scans`` rows are aligned with ``features`` rows and hold ``scan_id``, ``participant_id``
    and ``session_id``. Files are named ``<scan_id>.tsv`` and written atomically.
    """
    if len(scans) != len(features):
        raise ValueError(f"{len(scans)} scans but {len(features)} feature rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = feature_columns(features.shape[1])
    written = []
    for row, vector in zip(scans.itertuples(index=False), features, strict=True):
        table = pd.DataFrame([vector], columns=columns)
        table.insert(0, "model_id", model_id)
        table.insert(0, "session_id", row.session_id or "")
        table.insert(0, "participant_id", row.participant_id)
        path = out_dir / f"{row.scan_id}.tsv"
        write_table_atomic(table, path)
        written.append(path)
    return written


def cohort_table(
    qc: pd.DataFrame,
    feature_tables: Sequence[str | os.PathLike],
    participants: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per input scan: ids, status, reason, participants.tsv columns, features.

    Args:
        qc: the QC table (``participant_id``, ``session_id``, ``status``, ``reason``, ...).
        feature_tables: per-scan feature TSVs written by :func:`write_subject_tables`.
        participants: the participants table (``participant_id`` plus phenotypes), or None.

    Returns:
        The cohort table; features are empty (NaN) for excluded scans.
    """
    ids = ["participant_id", "session_id"]
    base = qc[ids + ["status", "reason"]].copy()
    base["session_id"] = base["session_id"].fillna("").astype(str)
    if participants is not None and len(participants.columns) > 1:
        extra = participants.drop_duplicates("participant_id")
        extra = extra[[c for c in extra.columns if c not in ("session_id", "status", "reason")]]
        base = base.merge(extra, on="participant_id", how="left")
    frames = [pd.read_csv(p, sep="\t", dtype={"session_id": str}) for p in feature_tables]
    if frames:
        feats = pd.concat(frames, ignore_index=True)
        feats["session_id"] = feats["session_id"].fillna("").astype(str)
        base = base.merge(feats, on=ids, how="left")
    return base


def _plain_spec(spec: Any) -> dict[str, Any]:
    """The encoder spec as plain values ({name, kwargs}) so the teacher file loads weights-only."""
    from nidl_dino.importing import import_path_of

    if isinstance(spec, str):
        return {"name": spec, "kwargs": {}}
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            path = import_path_of(name)
            if path is None:
                raise UserError("encoder.name must be a registry name or an import path string")
            name = path
        return {"name": name, "kwargs": dict(spec.get("kwargs", {}) or {})}
    path = import_path_of(type(spec)) if isinstance(spec, nn.Module) else import_path_of(spec)
    if path is None:
        raise UserError(
            "the encoder cannot be saved by reference: use a registry name or an importable class"
        )
    return {"name": path, "kwargs": {}}
