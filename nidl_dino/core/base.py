"""Estimator plumbing shared by our Lightning models: trainer options, fit, transform.

Mirrors nidl's ``BaseEstimator``/``TransformerMixin`` split: the estimator is a LightningModule
whose extra constructor keywords are Lightning ``Trainer`` options, with scikit-learn-like ``fit``
and ``transform`` methods taking data loaders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader


class NotFittedError(ValueError, AttributeError):
    """Raised when ``transform`` is called on an estimator that was neither fitted nor loaded."""


class BaseEstimator(pl.LightningModule):
    """LightningModule with scikit-learn-like ``fit``; extra keywords go to ``pl.Trainer``.

    Args:
        random_state: seed. When not None, it seeds the weight initialisation (the subclass
            builds its modules inside :meth:`_seeded`) and, at ``fit``, Lightning's
            ``seed_everything`` (data order, dataloader workers, random views). None: no
            reseeding at all.
        save_hparams: save the constructor arguments with ``save_hyperparameters`` (in
            checkpoints and loggers). ``fit`` works either way.
        **trainer_kwargs: ``inference_precision`` (precision of ``transform``; default
            ``"32-true"`` whatever ``precision`` training used, except that a 64-bit model
            stays 64-bit), then options of ``pytorch_lightning.Trainer`` (max_epochs, max_steps,
            callbacks, accelerator, devices, precision, strategy, logger, limit_train_batches,
            accumulate_grad_batches, default_root_dir, ...).
    """

    def __init__(
        self, random_state: int | None = None, save_hparams: bool = True, **trainer_kwargs
    ):
        super().__init__()
        self.random_state = random_state
        self.save_hparams = save_hparams
        self.fitted_ = False
        self.inference_precision = trainer_kwargs.pop("inference_precision", None)
        self.trainer_params_: dict[str, Any] = dict(trainer_kwargs)

    @property
    def fitted(self) -> bool:
        """True once the estimator was fitted or loaded from a checkpoint."""
        return self.fitted_

    @property
    def trainer_params(self) -> dict[str, Any]:
        """Options given to the Lightning ``Trainer`` by :meth:`fit`."""
        return self.trainer_params_

    @contextlib.contextmanager
    def _seeded(self):
        """Context in which module construction is seeded by ``random_state``.

        The global CPU RNG is forked, so building an estimator never changes the caller's
        random stream; with ``random_state=None`` nothing is reseeded.
        """
        if self.random_state is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            yield

    def fit(
        self,
        train_dataloader: DataLoader | None = None,
        val_dataloader: DataLoader | Sequence[DataLoader] | None = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ):
        """Train with a Lightning ``Trainer`` built from the estimator's trainer options.

        Args:
            train_dataloader: training batches (see the subclass for their format).
            val_dataloader: optional validation batches.
            datamodule: a LightningDataModule instead of the loaders.
            ckpt_path: a Lightning checkpoint to resume from ("last" resumes from the
                ModelCheckpoint's last file): weights, optimizer, LR schedule, epoch and step are
                restored, and training continues to the configured end. It is loaded
                weights-only (``torch.load(weights_only=True)``), whatever torch's default.

        Returns:
            self, fitted.
        """
        if train_dataloader is None and datamodule is None:
            raise ValueError("fit needs a train_dataloader or a datamodule")
        if self.random_state is not None:
            pl.seed_everything(int(self.random_state), workers=True, verbose=False)
        trainer = pl.Trainer(**self.trainer_params_)
        trainer.fit(
            self,
            train_dataloaders=train_dataloader,
            val_dataloaders=val_dataloader,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            weights_only=True,  # opening a checkpoint never runs code from it
        )
        self.fitted_ = True
        return self

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ):
        """Lightning's ``load_from_checkpoint``, weights-only by default.

        Lightning's own default loads URLs (and files, when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
        is set) with full unpickling, which runs any code the file carries; our checkpoints
        hold tensors and plain values only. Pass ``weights_only=False`` only for a trusted file
        that needs it. Other arguments as ``pytorch_lightning.LightningModule``'s.
        """
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            **kwargs,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Weights coming from a checkpoint count as a trained model for transform().
        self.fitted_ = True

    def _check_is_fitted(self) -> None:
        if not self.fitted_:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call fit(train_loader) first, or "
                f"load trained weights with {type(self).__name__}.load_from_checkpoint(path)"
            )

    def _inference_trainer(self) -> pl.Trainer:
        """A one-device Trainer for inference: every sample once, in loader order."""
        keep = ("accelerator", "enable_progress_bar", "default_root_dir")
        params = {k: v for k, v in self.trainer_params_.items() if k in keep}
        params["precision"] = self.inference_precision or _inference_default(
            self.trainer_params_.get("precision")
        )
        return pl.Trainer(
            devices=1,
            strategy="auto",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            **params,
        )


def _inference_default(training_precision: Any) -> str:
    """float32 inference (features off by ~0.3 % in bf16), unless the model was trained 64-bit."""
    if str(training_precision) in ("64", "64-true"):
        return "64-true"
    return "32-true"


class TransformerMixin:
    """Adds ``transform`` and ``transform_with_targets`` on top of a ``transform_step``.

    Inference runs through Lightning's predict loop on a single device, so the rows come back
    exactly once each, in the loader's order (multi-device prediction would pad and interleave
    samples across processes).
    """

    _estimator_type = "transformer"
    _return_targets = False

    def transform(self, test_dataloader: DataLoader) -> torch.Tensor:
        """Encode every sample of ``test_dataloader``.

        Args:
            test_dataloader: yields input tensors, or ``(x, y)`` pairs whose ``y`` is ignored.

        Returns:
            A CPU tensor (N, D), rows in loader order.

        Raises:
            NotFittedError: if the estimator was neither fitted nor loaded.
        """
        features, _ = self._predict(test_dataloader, with_targets=False)
        return features

    def transform_with_targets(
        self, test_dataloader: DataLoader
    ) -> tuple[torch.Tensor, torch.Tensor | list | None]:
        """Like :meth:`transform`, also returning the targets ``y`` of ``(x, y)`` batches.

        Returns:
            ``(features, targets)``: features (N, D); targets concatenated along the first axis
            (a tensor when they are tensors, else a list), None if the batches carry none.
        """
        return self._predict(test_dataloader, with_targets=True)

    def _predict(self, loader: DataLoader, with_targets: bool):
        self._check_is_fitted()
        trainer = self._inference_trainer()
        self._return_targets = with_targets
        try:
            outputs = trainer.predict(self, dataloaders=loader, return_predictions=True)
        finally:
            self._return_targets = False
        if not outputs:
            raise ValueError("transform: the data loader yielded no batch")
        if not with_targets:
            return torch.cat(outputs), None
        features = torch.cat([f for f, _ in outputs])
        targets = [t for _, t in outputs]
        if all(t is None for t in targets):
            return features, None
        if all(isinstance(t, torch.Tensor) for t in targets):
            return features, torch.cat(targets)
        merged: list = []
        for t in targets:
            merged.extend(list(t))
        return features, merged

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        x, y = _split_inputs_targets(batch)
        features = self.transform_step(x, batch_idx, dataloader_idx).detach().float().cpu()
        if self._return_targets:
            if isinstance(y, torch.Tensor):
                y = y.detach().cpu()
            return features, y
        return features


def _split_inputs_targets(batch: Any) -> tuple[Any, Any]:
    """``x`` -> (x, None); ``(x, y)`` / ``[x, y]`` -> (x, y); dict with "image" -> (image, label)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["image"], batch.get("label")
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        return batch[0], None
    raise ValueError(
        "transform expects batches of tensors (B, C, D, H, W) or (x, y) pairs, got a "
        f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
    )
