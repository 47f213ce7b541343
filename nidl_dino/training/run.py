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
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from nidl_dino.atomic import write_text_atomic
from nidl_dino.core.estimator import DINO
from nidl_dino.encoders.networks import build_encoder
from nidl_dino.errors import UserError
from nidl_dino.features.teacher import save_teacher
from nidl_dino.settings import with_defaults
from nidl_dino.training.data import DINODataModule, resolve_num_workers, resolve_views_on_device
from nidl_dino.training.devices import trainer_options
from nidl_dino.training.distributed import RankRecord
from nidl_dino.training.progress import EpochProgress, quiet_lightning
from nidl_dino.training.resources import n_devices
from nidl_dino.workflow.layout import ScanFiles, source_of_volume

log = logging.getLogger(__name__)

#: Config sections whose change makes old checkpoints unusable for a resume.
FINGERPRINT_SECTIONS = ("encoder", "views", "dino", "seed")
#: Options of the ``trainer:`` section that change the schedules (and so the resume target).
FINGERPRINT_TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches")


def training_fingerprint(config: Mapping[str, Any], volume_paths: Sequence[str]) -> str:
    """Hash of what determines a training run: model, views, schedules, seed and the cohort."""
    config = with_defaults(config)
    trainer = config["trainer"]
    payload = {
        "sections": {k: config.get(k) for k in FINGERPRINT_SECTIONS},
        "trainer": {k: trainer.get(k) for k in FINGERPRINT_TRAINER_KEYS},
        "batch_size": config["data"]["batch_size"],
        "volumes": sorted(volume_keys(volume_paths)),
    }
    if resolve_views_on_device(config["data"]["views_on_device"], trainer["accelerator"]):
        # device views draw other random numbers than the CPU workers: no resume across them
        # (only added when set, so the fingerprints of existing CPU-view runs are unchanged)
        payload["views_on_device"] = True
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def volume_keys(volume_paths: Sequence[str]) -> list[str]:
    """What each training volume was made from, as text for :func:`training_fingerprint`.

    The file name, and the input section of the preprocessing signature the workflow writes
    beside the volume (:attr:`~nidl_dino.workflow.layout.ScanFiles.signature`: the input scan's
    name, size and modification time, and the hash of the preprocessing configuration), so that
    re-preprocessed volumes (another preprocessing setting, a replaced scan) never resume a
    training of the old ones, while moving ``output_dir`` still resumes. A volume without a
    signature (made outside the workflow) is keyed on its own size and modification time; one
    that cannot be read, on its name alone.
    """
    keys = []
    for path in volume_paths:
        name = os.path.basename(str(path))
        source = source_of_volume(path)
        signature = ScanFiles(Path(path).parent, source).signature if source else None
        made_from: Any = None
        if signature is not None and signature.is_file():
            try:
                made_from = json.loads(signature.read_text()).get("input")
            except (OSError, ValueError, AttributeError):
                made_from = None
        if isinstance(made_from, dict):
            made_from = {
                **made_from,
                "input_file": os.path.basename(str(made_from.get("input_file"))),
            }
        else:
            try:
                stat = os.stat(path)
                made_from = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            except OSError:
                made_from = None
        keys.append(json.dumps([name, made_from], sort_keys=True, default=str))
    return keys


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
    if not marker.exists() or marker.read_text().strip() != fingerprint:
        # atomic: other ranks (SLURM tasks) may be reading it (_resume_checkpoint_read_only)
        write_text_atomic(marker, fingerprint + "\n")
    return str(last) if last.exists() else None


def build_model(
    config: Mapping[str, Any], num_local_crops: int, image_sizes: Any = None, **trainer_kwargs
) -> DINO:
    """The DINO estimator described by the config's ``encoder`` and ``dino`` sections.

    ``image_sizes`` are the view sizes the encoder will see (global, local), checked now.
    """
    config = with_defaults(config)
    # The config's seed fixes the encoder's initial weights, whatever the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        encoder = build_encoder(config["encoder"], in_channels=1, image_size=image_sizes)
    dino_cfg = dict(config.get("dino") or {})
    return DINO(
        encoder,
        proj_input_dim=int(encoder.output_dim),
        num_local_crops=num_local_crops,
        random_state=config["seed"],
        **dino_cfg,
        **trainer_kwargs,
    )


def train_from_config(
    volume_paths: Sequence[str],
    config: Mapping[str, Any],
    work_dir: str | os.PathLike,
    teacher_path: str | os.PathLike,
    val_paths: Sequence[str] | None = None,
    threads: int | None = None,
    memory_mb: float | None = None,
    scan_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train DINO on ``volume_paths`` and save the teacher to ``teacher_path``.

    Args:
        volume_paths: preprocessed volumes (NIfTI) of the scans that passed QC.
        config: the workflow configuration (sections ``encoder``, ``views``, ``data``,
            ``dino``, ``trainer``, ``seed``).
        work_dir: checkpoints (``checkpoints/last.ckpt``, ``checkpoints/best.ckpt``), logs
            (``logs/csv/version_*/metrics.csv``, ``logs/tensorboard/version_*``, one version per
            start) and ``training_curves.png`` go here.
        teacher_path: where the trained teacher is saved (:func:`nidl_dino.features.teacher.save_teacher`).
        val_paths: optional validation volumes.
        threads: the job's CPUs, the loader workers of ``data.num_workers: auto`` (None: the
            CPUs this process may run on).
        memory_mb: the job's memory, which decides ``data.cache: auto`` (None: the cgroup
            limit or the machine's memory).
        scan_ids: the scan ids of ``volume_paths``, which the model card counts and hashes
            (None: the ``<source>`` of each preprocessed volume's name, else its file name).

    ``data.views_on_device: auto`` is on when training runs on a CUDA GPU. The resolved values
    are logged; the fingerprint sees the resolved ``views_on_device``.

    Returns:
        A summary: steps, epochs, resumed-from path, fingerprint, model id, final loss.
    """
    work = Path(work_dir)
    # Before anything is written: a GPU run without a usable GPU stops here, in one line.
    config = with_defaults(config)
    trainer_cfg = trainer_options(config["trainer"])
    if len(volume_paths) < 2:
        raise UserError(
            f"training needs at least 2 scans that passed QC, got {len(volume_paths)}: check "
            "qc/qc.tsv for the exclusion reasons"
        )
    data_cfg = dict(config["data"])
    data_cfg["views_on_device"] = resolve_views_on_device(
        data_cfg["views_on_device"], config["trainer"]["accelerator"]
    )
    try:
        data_cfg["num_workers"] = resolve_num_workers(data_cfg["num_workers"], threads)
    except UserError as err:
        raise UserError(f"data.{err}") from None
    config = {**config, "data": data_cfg}
    log.info(
        "data: %d loader workers, views on the %s",
        data_cfg["num_workers"],
        "device" if data_cfg["views_on_device"] else "loader workers (CPU)",
    )
    fingerprint = training_fingerprint(config, volume_paths)
    ckpt_dir = work / "checkpoints"
    rank = _launch_rank()
    ckpt_path = (
        resume_checkpoint(ckpt_dir, fingerprint)
        if rank == 0
        else _resume_checkpoint_read_only(ckpt_dir, fingerprint)
    )
    if ckpt_path:
        log.info("resuming training from %s", ckpt_path)

    seed = int(config["seed"])
    datamodule = DINODataModule(
        volume_paths,
        views_config=config["views"],
        batch_size=int(data_cfg["batch_size"]),
        num_workers=int(data_cfg["num_workers"]),
        pin_memory=data_cfg["pin_memory"],
        persistent_workers=bool(data_cfg["persistent_workers"]),
        cache=data_cfg["cache"],
        cache_dir=data_cfg["cache_dir"] or str(work / "cache"),
        views_on_device=data_cfg["views_on_device"],
        seed=seed,
        val_paths=val_paths,
        memory_mb=memory_mb,
    )

    monitor = "val/loss" if val_paths else "train/loss_epoch"
    callbacks = [
        EpochProgress(),
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
    if not val_paths:  # no validation loop at all (else Lightning warns of an empty one)
        trainer_cfg.setdefault("limit_val_batches", 0)
        trainer_cfg.setdefault("num_sanity_val_steps", 0)
    quiet_lightning()
    if n_devices(trainer_cfg) > 1:
        # each rank records its shard and its final teacher (work/ranks/rank-<r>.json)
        callbacks.append(RankRecord(work / "ranks"))
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
    if model.trainer.global_rank != 0:
        # Every rank ends with the same teacher (tested): one process writes the outputs.
        _barrier()
        return summary

    from nidl_dino.model import training_card

    monitors = {
        k: _to_float(v) for k, v in model.trainer.callback_metrics.items() if k.startswith("train/")
    }
    # The model card's training part travels inside the teacher file (model.py), with the
    # preprocessing it expects: a run that applies this teacher checks it before any job.
    if scan_ids is None:
        scan_ids = [source_of_volume(p) or os.path.basename(str(p)) for p in volume_paths]
    card = training_card(config, scan_ids, summary, monitors)
    model_id = save_teacher(
        model.teacher,
        config["encoder"],
        teacher_path,
        image_size=[list(s) for s in datamodule.image_sizes],
        extra={
            "fingerprint": fingerprint,
            "global_step": int(model.trainer.global_step),
            "card": card,
        },
    )
    from nidl_dino.training.curves import plot_training_curves

    plot_training_curves(
        sorted((work / "logs" / "csv").glob("version_*/metrics.csv")), work / "training_curves.png"
    )
    summary = {"model_id": model_id, **summary}
    (work / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _barrier()
    return summary


def _launch_rank() -> int:
    """This process's global rank as its launcher set it (SLURM task, torchrun), before DDP."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _resume_checkpoint_read_only(ckpt_dir: Path, fingerprint: str) -> str | None:
    """What :func:`resume_checkpoint` returns, without moving or writing anything (ranks > 0)."""
    marker, last = ckpt_dir / "fingerprint.txt", ckpt_dir / "last.ckpt"
    try:
        same = marker.read_text().strip() == fingerprint
    except OSError:
        return None
    return str(last) if same and last.exists() else None


def _barrier() -> None:
    """Wait for every rank (outputs written by rank 0) when a process group is still up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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


def _rank_main(spec_path: str) -> None:
    """One rank: train from the spec that :func:`nidl_dino.training.distributed.run_ranks` wrote."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_path).read_text())
    train_from_config(**spec)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
