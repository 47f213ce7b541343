"""Data loading of preprocessed volumes for DINO training and feature extraction.

- :class:`VolumeDataset`: preprocessed NIfTI volumes read by MONAI (``LoadImage``, channel
  first, float32), optionally cached in memory (``CacheDataset``) or on disk
  (``PersistentDataset``), then an optional random transform (the views) applied per fetch.
- :class:`DINODataModule`: the training data as a ``LightningDataModule``. Batches are
  ``[g1, g2, l1, ..., lN]``, each ``(B, C, D, H, W)``. Views are made by the loader's CPU workers,
  or, with ``views_on_device=True``, on the accelerator after the whole volumes ``(B, C, D, H, W)``
  were moved there (``on_after_batch_transfer``), so that a GPU run is not bound by the CPU
  workers. The estimator sees the same batches either way.
- :func:`volume_loader`: whole volumes ``(B, 1, D, H, W)`` in the given order, for extraction.

Loaders are ``monai.data.DataLoader`` with the torch default collate (MONAI's collate would
flatten the list of views into the batch) and MONAI's ``worker_init_fn``, which seeds every random
transform of each worker from the loader's seeded generator: runs repeat, workers differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, EnsureType, LoadImage
from torch.utils.data import default_collate

from nidl_dino.errors import UserError
from nidl_dino.views import DEFAULT_VIEWS_CONFIG, MultiCropTransform

__all__ = ["CACHE_MODES", "DINODataModule", "VolumeDataset", "volume_loader"]

log = logging.getLogger(__name__)

#: Values of ``data.cache``: none (read each time), memory (``CacheDataset``), disk
#: (``PersistentDataset`` in ``cache_dir``).
CACHE_MODES = ("none", "memory", "disk")


class VolumeDataset(torch.utils.data.Dataset):
    """Preprocessed volumes, loaded (and cached) by MONAI, with an optional random transform.

    The deterministic part (read the file, channel first, float32 plain tensor) is what the
    cache holds; ``transform`` (e.g. a :class:`~nidl_dino.views.MultiCropTransform`) runs on each
    fetch, after the cache.

    Args:
        paths: volume files (NIfTI, or any format MONAI's ``LoadImage`` reads).
        transform: callable applied to each volume ``(C, D, H, W)``; None returns the volume.
        cache: ``"none"``, ``"memory"`` (all volumes in RAM, shared with forked workers) or
            ``"disk"`` (one ``.pt`` file per volume in ``cache_dir``, reused across runs).
        cache_dir: folder of the disk cache (required for ``cache="disk"``).
        cache_num_workers: threads that fill the memory cache.

    Raises:
        UserError: empty ``paths``, a missing file, an unknown ``cache``, or disk without dir.

    Attributes:
        dataset: the underlying MONAI ``Dataset``/``CacheDataset``/``PersistentDataset``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        transform: Callable[[torch.Tensor], Any] | None = None,
        cache: str = "none",
        cache_dir: str | os.PathLike | None = None,
        cache_num_workers: int = 1,
    ) -> None:
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise UserError("data: no volumes to load; check the preprocessing outputs")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise UserError(
                f"{missing[0]}: volume not found ({len(missing)} missing); rerun preprocessing"
            )
        steps: list[Callable] = [
            LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
        if transform is not None:
            steps.append(transform)
        pipeline = Compose(steps)
        if cache == "none":
            self.dataset = Dataset(self.paths, pipeline)
        elif cache == "memory":
            self.dataset = CacheDataset(
                self.paths, pipeline, num_workers=cache_num_workers, progress=False
            )
        elif cache == "disk":
            if cache_dir is None:
                raise UserError("data.cache_dir: needed for cache: disk; give a writable folder")
            os.makedirs(cache_dir, exist_ok=True)
            self.dataset = PersistentDataset(self.paths, pipeline, cache_dir=cache_dir)
        else:
            raise UserError(f"data.cache: {cache!r}; choose one of {', '.join(CACHE_MODES)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def _loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=default_collate,
        generator=torch.Generator().manual_seed(seed),
    )


def volume_loader(
    paths: Sequence[str | os.PathLike],
    batch_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Whole volumes in the given order (no shuffle, nothing dropped), for feature extraction.

    Args:
        paths: preprocessed volume files, all of the same shape (D, H, W) when ``batch_size > 1``.
        batch_size: volumes per batch.
        num_workers: loader worker processes.
        pin_memory: pin batches in page-locked memory; None pins when CUDA is available.

    Returns:
        A loader of float32 tensors ``(B, 1, D, H, W)``.

    Raises:
        UserError: empty ``paths`` or a missing file.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return _loader(VolumeDataset(paths), batch_size, num_workers, pin)


class DINODataModule(pl.LightningDataModule):
    """Training (and validation) data for :class:`nidl_dino.DINO`: volumes in, views out.

    Args:
        paths: preprocessed training volumes (float32, 1 channel, normalised).
        views_config: the ``views:`` section of config.yaml (partial mappings are merged over
            :data:`~nidl_dino.views.DEFAULT_VIEWS_CONFIG`); None uses the defaults.
        batch_size: volumes per batch. Training drops the last incomplete batch (batch norm in
            the head needs > 1 sample); a cohort smaller than ``batch_size`` trains with one
            batch of the whole cohort (a warning is logged).
        num_workers: loader worker processes (each makes views on the CPU unless
            ``views_on_device``).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies; None pins
            when CUDA is available.
        persistent_workers: keep workers (and their random streams) alive across epochs.
        cache: ``"none"``, ``"memory"`` or ``"disk"`` (see :class:`VolumeDataset`).
        cache_dir: folder of the disk cache.
        views_on_device: make the views on the training device, batch by batch, after the
            whole volumes were transferred (``on_after_batch_transfer``). Use with a GPU; on a
            CPU the default (False) lets the workers work in parallel with the training step.
            Requires fitting with ``datamodule=`` (Lightning calls the hook on the datamodule).
        seed: seeds the shuffling, the workers' view transforms and the device-side views.
        val_paths: optional validation volumes (views as for training, no shuffle, no drop).

    Raises:
        UserError: fewer than 2 training volumes, or a bad ``views_config``/``cache`` value.

    Example:
        >>> dm = DINODataModule(paths, DEFAULT_VIEWS_CONFIG, batch_size=4, num_workers=2)
        >>> model = DINO(build_encoder("small_cnn"), proj_input_dim=128,
        ...              num_local_crops=dm.num_local_crops, max_epochs=10)
        >>> model.fit(None, datamodule=dm)
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        views_config: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        cache: str = "none",
        cache_dir: str | os.PathLike | None = None,
        views_on_device: bool = False,
        seed: int = 0,
        val_paths: Sequence[str | os.PathLike] | None = None,
    ) -> None:
        super().__init__()
        self.paths = [str(p) for p in paths]
        self.val_paths = [str(p) for p in val_paths] if val_paths else []
        if len(self.paths) < 2:
            raise UserError(
                f"data: training needs at least 2 volumes (batch norm), got {len(self.paths)}"
            )
        if batch_size < 2:
            raise UserError(f"data.batch_size: {batch_size}; use at least 2 (batch norm)")
        if batch_size > len(self.paths):
            log.warning(
                "data.batch_size %d > %d training volumes: using batches of %d",
                batch_size,
                len(self.paths),
                len(self.paths),
            )
            batch_size = len(self.paths)
        if cache not in CACHE_MODES:
            raise UserError(f"data.cache: {cache!r}; choose one of {', '.join(CACHE_MODES)}")
        if num_workers < 0:
            raise UserError(f"data.num_workers: {num_workers}; use 0 or more")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = persistent_workers
        self.cache = cache
        self.cache_dir = cache_dir
        self.views_on_device = views_on_device
        self.seed = int(seed)
        self.views = MultiCropTransform(**(views_config or DEFAULT_VIEWS_CONFIG))
        self.views.set_random_state(self.seed)
        self.train_dataset: VolumeDataset | None = None
        self.val_dataset: VolumeDataset | None = None

    @property
    def num_local_crops(self) -> int:
        """Local views per volume, the estimator's ``num_local_crops``."""
        return self.views.num_local_crops

    @property
    def image_sizes(self) -> list[tuple[int, int, int]]:
        """Global and local view sizes (voxels), for ``build_encoder(image_size=...)``."""
        return [self.views.global_size, self.views.local_size]

    def _dataset(self, paths: list[str]) -> VolumeDataset:
        return VolumeDataset(
            paths,
            transform=None if self.views_on_device else self.views,
            cache=self.cache,
            cache_dir=self.cache_dir,
            cache_num_workers=max(1, self.num_workers),
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (fills the memory cache); idempotent."""
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.paths)
        if self.val_paths and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_paths)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches, last incomplete batch dropped; views or volumes (device views)."""
        self.setup()
        return _loader(
            self.train_dataset,
            self.batch_size,
            self.num_workers,
            self.pin_memory,
            self.persistent_workers,
            shuffle=True,
            drop_last=True,
            seed=self.seed,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order (none without ``val_paths``)."""
        self.setup()
        if self.val_dataset is None:
            return []
        return _loader(
            self.val_dataset,
            self.batch_size,
            self.num_workers,
            self.pin_memory,
            self.persistent_workers,
            seed=self.seed + 1,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``views_on_device``, turn volumes ``(B, C, D, H, W)`` into the list of views."""
        if self.views_on_device and isinstance(batch, torch.Tensor) and batch.ndim == 5:
            return self.views.batch_views(batch)
        return batch
