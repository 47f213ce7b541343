"""Training progress for people: one log line per epoch (loss, entropy, LR, speed, time left).

Lightning's progress bar redraws one terminal line, which a Snakemake log file or a SLURM output
file turns into noise or loses; a line per epoch through :mod:`logging` reaches both the job's
log file and the terminal Snakemake shows (see :func:`nidl_dino.workflow.jobs.job`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import pytorch_lightning as pl

from nidl_dino.errors import UserError

log = logging.getLogger("nidl_dino.train")

#: Lightning messages that say nothing about a workflow job, and why each is dropped.
_QUIET_WARNINGS = (
    # Lightning sees `srun` on PATH outside a SLURM step (every job on a SLURM login/compute node
    # and any machine with slurm-client): our jobs are single tasks launched by Snakemake.
    r"The `srun` command is available on your system but is not used",
    # Our checkpoint folder is ours: resume_checkpoint() guards it with a fingerprint.
    r"Checkpoint directory .* exists and is not empty",
    # Small cohorts have fewer batches per epoch than trainer.log_every_n_steps: the epoch's
    # means are logged at its end anyway, and EpochProgress prints a line per epoch.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Lightning 2.6's own use of torch.utils._pytree under torch >= 2.10 (not our code).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropAdvert(logging.Filter):
    """Drops Lightning's "Tip: ... litlogger" advert, printed at every Trainer start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's messages that are noise in a workflow job (idempotent)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in target.filters):
            target.addFilter(_DropAdvert())


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _metric(metrics: dict[str, Any], *names: str) -> float:
    for name in names:
        if name in metrics:
            try:
                return float(metrics[name])
            except (TypeError, ValueError):
                pass
    return math.nan


def _has_loss(metrics: dict[str, Any]) -> bool:
    return any(name in metrics for name in ("train/loss_epoch", "train/loss"))


class EpochProgress(pl.Callback):
    """Log one line per finished training epoch, on the first process only.

    The line holds the epoch (of ``max_epochs``), the global optimizer step, the epoch's mean
    loss, the teacher entropy (a collapse monitor, nats), the learning rate, the epoch's optimizer
    steps per second and the time left, estimated from the mean epoch time of this (re)start.

    An epoch whose mean loss is not finite stops the training with a :class:`UserError` (on every
    process, before the epoch's checkpoint is saved): diverged weights would otherwise train on
    to the last epoch and give every scan NaN features.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger_ = logger or log
        self._fit_start = 0.0
        self._epoch_start = 0.0
        self._epoch_step0 = 0
        self._epochs_done = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._epochs_done = 0
        if trainer.is_global_zero:
            self.logger_.info(
                "training: %d of %d epochs to go, %d batches per epoch, on %s",
                trainer.max_epochs - trainer.current_epoch,
                trainer.max_epochs,
                trainer.num_training_batches,
                trainer.strategy.root_device,
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_step0 = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = _metric(trainer.callback_metrics, "train/loss_epoch", "train/loss")
        if math.isinf(loss) or (math.isnan(loss) and _has_loss(trainer.callback_metrics)):
            # every rank sees it (DDP shares the gradients); raised before this epoch's checkpoint
            # is written (Lightning runs ModelCheckpoint last), so a rerun resumes finite weights
            raise UserError(
                f"training loss is not finite ({loss}) in epoch {trainer.current_epoch + 1} "
                f"(step {trainer.global_step}, trainer.precision {trainer.precision}): the weights "
                "diverged. On a CPU set trainer.precision: 32-true (oneDNN's bf16 3D-convolution "
                "gradients are at times not finite on some CPUs, benchmarks/README.md, session "
                "21); else lower dino.learning_rate or dino.clip_grad. Then run the same command "
                "again: training resumes from the last finite epoch"
            )
        now = time.perf_counter()
        self._epochs_done += 1
        steps = trainer.global_step - self._epoch_step0
        elapsed = max(now - self._epoch_start, 1e-9)
        metrics = trainer.callback_metrics
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups[:1]]
        epoch = trainer.current_epoch + 1
        left = (trainer.max_epochs - epoch) * (now - self._fit_start) / self._epochs_done
        if trainer.is_global_zero:
            self.logger_.info(
                "epoch %d/%d  step %d  loss %.4f  teacher entropy %.3f  lr %.3g  "
                "%.2f steps/s  %s left",
                epoch,
                trainer.max_epochs,
                trainer.global_step,
                _metric(metrics, "train/loss_epoch", "train/loss"),
                _metric(metrics, "train/teacher_entropy"),
                lrs[0] if lrs else math.nan,
                steps / elapsed,
                format_duration(left),
            )
