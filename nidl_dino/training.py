"""Training DINO on preprocessed volumes from the workflow's configuration, resumably.

The ``train`` rule calls :func:`train_from_config`. Checkpoints (last and best), CSV and
TensorBoard logs live below ``work_dir``, which the workflow does not declare as an output: when a
killed job is re-run, Snakemake does not wipe them, and training resumes from ``last.ckpt``. A
fingerprint of the training configuration and of the volume list guards the resume: checkpoints
of another configuration are moved aside (never deleted) and training starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from nidl_dino.data import DINODataModule
from nidl_dino.distributed import RankRecord, n_devices
from nidl_dino.encoders import build_encoder
from nidl_dino.errors import UserError
from nidl_dino.estimator import DINO
from nidl_dino.features import save_teacher

log = logging.getLogger(__name__)

#: Config sections whose change makes old checkpoints unusable for a resume.
FINGERPRINT_SECTIONS = ("encoder", "views", "dino", "seed")
#: Options of the ``trainer:`` section that change the schedules (and so the resume target).
FINGERPRINT_TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches")


def training_fingerprint(config: Mapping[str, Any], volume_paths: Sequence[str]) -> str:
    """Hash of what determines a training run: model, views, schedules, seed and the cohort."""
    trainer = config.get("trainer", {}) or {}
    payload = {
        "sections": {k: config.get(k) for k in FINGERPRINT_SECTIONS},
        "trainer": {k: trainer.get(k) for k in FINGERPRINT_TRAINER_KEYS},
        "batch_size": (config.get("data", {}) or {}).get("batch_size"),
        "volumes": sorted(os.path.basename(str(p)) for p in volume_paths),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_checkpoint(ckpt_dir: Path, fingerprint: str) -> str | None:
    """Path of ``last.ckpt`` when it belongs to this configuration, else None.

    Checkpoints written under another fingerprint are moved to ``<ckpt_dir>.stale-<time>``.
    """
    marker = ckpt_dir / "fingerprint.txt"
    last = ckpt_dir / "last.ckpt"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        previous = marker.read_text().strip() if marker.exists() else None
        if previous != fingerprint:
            stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning(
                "checkpoints in %s belong to another configuration: moved to %s", ckpt_dir, stale
            )
            shutil.move(str(ckpt_dir), str(stale))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return str(last) if last.exists() else None


def build_model(
    config: Mapping[str, Any], num_local_crops: int, image_sizes: Any = None, **trainer_kwargs
) -> DINO:
    """The DINO estimator described by the config's ``encoder`` and ``dino`` sections.

    ``image_sizes`` are the view sizes the encoder will see (global, local), checked now.
    """
    # The config's seed fixes the encoder's initial weights, whatever the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        encoder = build_encoder(
            config.get("encoder", "small_cnn"), in_channels=1, image_size=image_sizes
        )
    dino_cfg = dict(config.get("dino", {}) or {})
    return DINO(
        encoder,
        proj_input_dim=int(encoder.output_dim),
        num_local_crops=num_local_crops,
        random_state=config.get("seed", 0),
        **dino_cfg,
        **trainer_kwargs,
    )


def train_from_config(
    volume_paths: Sequence[str],
    config: Mapping[str, Any],
    work_dir: str | os.PathLike,
    teacher_path: str | os.PathLike,
    val_paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train DINO on ``volume_paths`` and save the teacher to ``teacher_path``.

    Args:
        volume_paths: preprocessed volumes (NIfTI) of the scans that passed QC.
        config: the workflow configuration (sections ``encoder``, ``views``, ``data``,
            ``dino``, ``trainer``, ``seed``).
        work_dir: checkpoints (``checkpoints/last.ckpt``, ``checkpoints/best.ckpt``), logs
            (``logs/csv/version_*/metrics.csv``, ``logs/tensorboard/version_*``, one version per
            start) and ``training_curves.png`` go here.
        teacher_path: where the trained teacher is saved (:func:`nidl_dino.features.save_teacher`).
        val_paths: optional validation volumes.

    Returns:
        A summary: steps, epochs, resumed-from path, fingerprint, model id, final loss.
    """
    work = Path(work_dir)
    if len(volume_paths) < 2:
        raise UserError(
            f"training needs at least 2 scans that passed QC, got {len(volume_paths)}: check "
            "qc/qc.tsv for the exclusion reasons"
        )
    fingerprint = training_fingerprint(config, volume_paths)
    ckpt_dir = work / "checkpoints"
    ckpt_path = resume_checkpoint(ckpt_dir, fingerprint)
    if ckpt_path:
        log.info("resuming training from %s", ckpt_path)

    data_cfg = dict(config.get("data", {}) or {})
    seed = int(config.get("seed", 0))
    datamodule = DINODataModule(
        volume_paths,
        views_config=config.get("views"),
        batch_size=int(data_cfg.get("batch_size", 8)),
        num_workers=int(data_cfg.get("num_workers", 0)),
        pin_memory=data_cfg.get("pin_memory"),
        persistent_workers=bool(data_cfg.get("persistent_workers", True)),
        cache=data_cfg.get("cache", "none"),
        cache_dir=data_cfg.get("cache_dir") or str(work / "cache"),
        views_on_device=bool(data_cfg.get("views_on_device", False)),
        seed=seed,
        val_paths=val_paths,
    )

    monitor = "val/loss" if val_paths else "train/loss_epoch"
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            every_n_epochs=1,
            save_top_k=1,
            enable_version_counter=False,
        ),
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode="min",
            save_top_k=1,
            enable_version_counter=False,
        ),
    ]
    loggers = [
        # One version folder per (re)start: a resumed run appends a version, never overwrites.
        CSVLogger(str(work / "logs"), name="csv"),
        TensorBoardLogger(str(work / "logs"), name="tensorboard", default_hp_metric=False),
    ]
    trainer_cfg = dict(config.get("trainer", {}) or {})
    trainer_cfg.setdefault("log_every_n_steps", 1)
    if n_devices(trainer_cfg) > 1:
        # each rank records its shard and its final teacher (work/ranks/rank-<r>.json)
        callbacks.append(RankRecord(work / "ranks"))
        # PyTorch's SyncBatchNorm runs on GPUs only; on CPUs the estimator averages the
        # BatchNorm buffers across ranks after each step instead
        accelerator = str(trainer_cfg.get("accelerator", "auto"))
        if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
            trainer_cfg.setdefault("sync_batchnorm", True)
    model = build_model(
        config,
        num_local_crops=datamodule.num_local_crops,
        image_sizes=datamodule.image_sizes,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(work),
        **trainer_cfg,
    )
    model.fit(datamodule=datamodule, ckpt_path=ckpt_path)
    summary = {
        "fingerprint": fingerprint,
        "resumed_from": ckpt_path,
        "global_step": int(model.trainer.global_step),
        "epochs": int(model.trainer.current_epoch),
        "n_train_volumes": len(volume_paths),
        "final_loss": _to_float(model.trainer.callback_metrics.get("train/loss_epoch")),
    }
    if not model.trainer.is_global_zero:
        return summary  # every rank holds the same teacher: rank 0 writes the outputs

    model_id = save_teacher(
        model.teacher,
        config.get("encoder", "small_cnn"),
        teacher_path,
        image_size=[list(s) for s in datamodule.image_sizes],
        extra={"fingerprint": fingerprint, "global_step": int(model.trainer.global_step)},
    )
    from nidl_dino.curves import plot_training_curves

    plot_training_curves(
        sorted((work / "logs" / "csv").glob("version_*/metrics.csv")), work / "training_curves.png"
    )
    summary = {"model_id": model_id, **summary}
    (work / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _to_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


__all__ = [
    "build_model",
    "resume_checkpoint",
    "train_from_config",
    "training_fingerprint",
]
