"""Data loading of preprocessed volumes for DINO training and feature extraction.

- :class:`VolumeDataset`: preprocessed NIfTI volumes read by MONAI (``LoadImage``, channel
  first, float32), optionally cached in memory (``CacheDataset``) or on disk (uncompressed
  ``.npy`` read memory-mapped, :class:`~nidl_dino.training.volume_cache.NpyVolumeCache`), then an optional
  random transform (the views) applied per fetch.
- :class:`DINODataModule`: the training data as a ``LightningDataModule``. Batches are
  ``[g1, g2, l1, ..., lN]``, each ``(B, C, D, H, W)``. Views are made by the loader's CPU workers,
  or, with ``views_on_device=True``, on the accelerator after the whole volumes ``(B, C, D, H, W)``
  were moved there (``on_after_batch_transfer``, :class:`~nidl_dino.views.device.DeviceViews`,
  seeded per batch from (seed, epoch, rank, sample indices)), so that a GPU run is not bound by
  the CPU workers. The estimator sees batches of the same format either way.
- :func:`volume_loader`: whole volumes ``(B, 1, D, H, W)`` in the given order, for extraction.
- :func:`resolve_num_workers`, :func:`resolve_views_on_device`: the ``auto`` values of
  ``data.num_workers``/``extract.num_workers`` (the job's CPUs) and ``data.views_on_device``
  (on for GPU runs).

Loaders are ``monai.data.DataLoader`` with the torch default collate (MONAI's collate would
flatten the list of views into the batch) and MONAI's ``worker_init_fn``, which seeds every random
transform of each worker from the loader's seeded generator: runs repeat, workers differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, EnsureType, LoadImage
from torch.utils.data import default_collate

from nidl_dino.errors import UserError
from nidl_dino.training.volume_cache import NpyVolumeCache, plan_volume_cache, resolve_cache_dir
from nidl_dino.views.crops import DEFAULT_VIEWS_CONFIG, MultiCropTransform
from nidl_dino.views.device import DeviceViews

__all__ = [
    "CACHE_MODES",
    "DINODataModule",
    "VolumeDataset",
    "resolve_num_workers",
    "resolve_views_on_device",
    "volume_loader",
]

log = logging.getLogger(__name__)

#: Values of ``data.cache``: auto (memory when the cohort fits half of the job's memory, else
#: disk), none (read each time), memory (``CacheDataset``), disk (``.npy`` files in ``cache_dir``).
CACHE_MODES = ("auto", "none", "memory", "disk")


def resolve_num_workers(value: int | str, threads: int | None = None) -> int:
    """Loader workers for ``data.num_workers``/``extract.num_workers``.

    Args:
        value: a count, or ``"auto"``: the job's CPUs, i.e. ``threads`` (the rule's threads,
            which SLURM gives as CPUs per task) when given, else the CPUs this process may run
            on (``os.sched_getaffinity``).
        threads: the job's threads.

    Raises:
        UserError: a negative count or another string.
    """
    if value == "auto":
        if threads:
            return max(1, int(threads))
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"num_workers: {value!r}; use auto or a count >= 0")
    return value


def resolve_views_on_device(value: bool | str, accelerator: Any = "auto") -> bool:
    """``data.views_on_device``: ``"auto"`` is true when training runs on a CUDA GPU.

    ``accelerator`` is ``trainer.accelerator``: ``gpu``/``cuda``, or ``auto`` where torch sees
    a CUDA device (what Lightning then picks). CPU runs keep the views in the loader workers,
    where they overlap with the training step.
    """
    if value != "auto":
        return bool(value)
    name = str(accelerator or "auto").lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


class VolumeDataset(torch.utils.data.Dataset):
    """Preprocessed volumes, loaded (and cached) by MONAI, with an optional random transform.

    The deterministic part (read the file, channel first, float32 plain tensor) is what the
    cache holds; ``transform`` (e.g. a :class:`~nidl_dino.views.crops.MultiCropTransform`) runs on each
    fetch, after the cache.

    Args:
        paths: volume files (NIfTI, or any format MONAI's ``LoadImage`` reads).
        transform: callable applied to each volume ``(C, D, H, W)``; None returns the volume.
        cache: ``"none"``, ``"memory"`` (all volumes in RAM, shared with forked workers),
            ``"disk"`` (one uncompressed ``.npy`` file per volume in ``cache_dir``, read
            memory-mapped, reused across runs) or ``"auto"`` (memory when the cohort takes at
            most half of the job's memory, else disk:
            :func:`~nidl_dino.training.volume_cache.plan_volume_cache`).
        cache_dir: folder of the disk cache (required for ``cache="disk"``).
        cache_num_workers: threads that fill the memory cache.

    Raises:
        UserError: empty ``paths``, a missing file, an unknown ``cache``, or disk without dir.

    Attributes:
        dataset: the underlying MONAI ``Dataset`` or ``CacheDataset``.
        cache: the cache mode used (``auto`` resolved).
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
        # a flat list: CacheDataset caches the steps before the first random one (a nested
        # Compose counts as random)
        steps: list[Callable] = [
            LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
        if cache not in CACHE_MODES:
            raise UserError(f"data.cache: {cache!r}; choose one of {', '.join(CACHE_MODES)}")
        if cache == "auto":
            cache = plan_volume_cache(self.paths, cache, cache_dir)
        if cache == "disk":
            if cache_dir is None:
                raise UserError("data.cache_dir: needed for cache: disk; give a writable folder")
            steps = [NpyVolumeCache(resolve_cache_dir(cache_dir), Compose(steps))]
        pipeline = Compose(steps if transform is None else [*steps, transform])
        self.cache = cache
        if cache in ("none", "disk"):
            self.dataset = Dataset(self.paths, pipeline)
        elif cache == "memory":
            self.dataset = CacheDataset(
                self.paths, pipeline, num_workers=cache_num_workers, progress=False
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        if isinstance(index, tuple):  # an (epoch, index) key of EpochSeededSampler
            index = index[1]
        return self.dataset[index]


class EpochSeededSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys, in an order drawn from ``(seed, epoch)`` alone.

    Together with :class:`SeededViews`, which seeds each sample's views from
    ``(seed, epoch, index)``, an epoch's batches and views are a pure function of the seed and the
    epoch: they do not depend on the number of loader workers, and a run resumed from a
    checkpoint at epoch k draws exactly what an uninterrupted run draws at epoch k. Written by
    hand: torch's samplers draw from a generator whose state a restart does not restore.

    Args:
        n: dataset length.
        seed: base seed.
        shuffle: permute the indices (else 0..n-1).
        epoch_fn: returns the current epoch when iteration starts (e.g. the Lightning trainer's
            ``current_epoch``); without it, the value given to :meth:`set_epoch` is used.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, epoch_fn: Callable[[], int] | None = None
    ) -> None:
        self.n, self.seed, self.shuffle, self.epoch_fn = n, int(seed), shuffle, epoch_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = range(self.n)
        for index in order:
            yield (epoch, index)


class SeededViews(torch.utils.data.Dataset):
    """Volumes with their random views, seeded per sample from ``(seed, epoch, index)``.

    Args:
        volumes: the volumes (no transform), e.g. a cached :class:`VolumeDataset`.
        views: the view transform; reseeded before each sample.
        seed: base seed.
    """

    def __init__(self, volumes: torch.utils.data.Dataset, views: MultiCropTransform, seed: int):
        self.volumes, self.views, self.seed = volumes, views, int(seed)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        self.views.set_random_state(_mix_seed(self.seed, epoch, index))
        return self.views(self.volumes[index])


class KeyedVolumes(torch.utils.data.Dataset):
    """Volumes with their ``(epoch, index)`` key, for views made on the device after transfer.

    Items are ``(volume, epoch, index)``; the collate makes ``[volumes (B, C, D, H, W), epochs
    (B,), indices (B,)]``, from which :class:`DINODataModule` seeds the batch's views.
    """

    def __init__(self, volumes: torch.utils.data.Dataset):
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.volumes[index], int(epoch), int(index)


@dataclass
class VolumeBatch:
    """Whole volumes on their way to the device, with the seed of their views (a host int)."""

    volumes: torch.Tensor
    seed: int


def _mix_seed(*values: int) -> int:
    """A 32-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def _loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
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
            :data:`~nidl_dino.views.crops.DEFAULT_VIEWS_CONFIG`); None uses the defaults.
        batch_size: volumes per batch. Training drops the last incomplete batch (batch norm in
            the head needs > 1 sample); a cohort smaller than ``batch_size`` trains with one
            batch of the whole cohort (a warning is logged).
        num_workers: loader worker processes (each makes views on the CPU unless
            ``views_on_device``); ``"auto"``: the CPUs of this process
            (:func:`resolve_num_workers`).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies; None pins
            when CUDA is available.
        persistent_workers: keep workers (and their random streams) alive across epochs.
        cache: ``"auto"``, ``"none"``, ``"memory"`` or ``"disk"`` (see :class:`VolumeDataset`),
            resolved and checked here, before training starts
            (:func:`~nidl_dino.training.volume_cache.plan_volume_cache`): a disk cache that would not fit
            the free space of ``cache_dir`` raises.
        cache_dir: folder of the disk cache (``$VARS`` expanded).
        memory_mb: the job's memory for ``cache="auto"`` (None: the cgroup limit or the
            machine's memory).
        views_on_device: make the views on the training device, batch by batch, after the
            whole volumes were transferred (``on_after_batch_transfer``), with
            :class:`~nidl_dino.views.device.DeviceViews` seeded from (seed, epoch, rank, the
            batch's sample indices): ranks differ, a resumed run repeats. Use with a GPU; on a
            CPU the default (False) lets the workers work in parallel with the training step.
            Requires fitting with ``datamodule=`` (Lightning calls the hook on the datamodule).
            ``"auto"``: on when torch sees a CUDA device (:func:`resolve_views_on_device`).
        seed: seeds the shuffling, the workers' view transforms and the device-side views.
        val_paths: optional validation volumes (views as for training, no shuffle, no drop).

    Raises:
        UserError: fewer than 2 training volumes, a bad ``views_config``/``cache`` value, or a
            disk cache that does not fit its disk.

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
        num_workers: int | str = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        cache: str = "none",
        cache_dir: str | os.PathLike | None = None,
        views_on_device: bool | str = False,
        seed: int = 0,
        val_paths: Sequence[str | os.PathLike] | None = None,
        memory_mb: float | None = None,
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
        try:
            num_workers = resolve_num_workers(num_workers)
        except UserError as err:
            raise UserError(f"data.{err}") from None
        memory = None if memory_mb is None else int(float(memory_mb) * 2**20)
        # resolved (and a disk cache's size checked) now, before anything trains
        cache = plan_volume_cache(self.paths + self.val_paths, cache, cache_dir, memory)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = persistent_workers
        self.cache = cache
        self.cache_dir = cache_dir
        self.views_on_device = resolve_views_on_device(views_on_device)
        self.seed = int(seed)
        self.views = MultiCropTransform(**(views_config or DEFAULT_VIEWS_CONFIG))
        self.views.set_random_state(self.seed)
        self.device_views = DeviceViews(self.views)
        self.train_dataset: torch.utils.data.Dataset | None = None
        self.val_dataset: torch.utils.data.Dataset | None = None

    @property
    def num_local_crops(self) -> int:
        """Local views per volume, the estimator's ``num_local_crops``."""
        return self.views.num_local_crops

    @property
    def image_sizes(self) -> list[tuple[int, int, int]]:
        """Global and local view sizes (voxels), for ``build_encoder(image_size=...)``."""
        return [self.views.global_size, self.views.local_size]

    def _dataset(self, paths: list[str]) -> torch.utils.data.Dataset:
        volumes = VolumeDataset(
            paths,
            transform=None,
            cache=self.cache,
            cache_dir=self.cache_dir,
            cache_num_workers=max(1, self.num_workers),
        )
        if self.views_on_device:
            return KeyedVolumes(volumes)
        return SeededViews(volumes, self.views, self.seed)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

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
            drop_last=True,
            seed=self.seed,
            sampler=EpochSeededSampler(
                len(self.train_dataset), self.seed, shuffle=True, epoch_fn=self._current_epoch
            ),
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
            # the same views at every validation: epoch-to-epoch changes are the model's
            sampler=EpochSeededSampler(
                len(self.val_dataset), self.seed + 1, shuffle=False, epoch_fn=lambda: 0
            ),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``views_on_device``, seed the batch's views while its keys are on the host.

        The seed mixes ``(seed, epoch, rank, the batch's sample indices)``: the indices of an
        epoch's batches are a function of (seed, epoch) (:class:`EpochSeededSampler`, and
        Lightning's distributed wrapper of it), so the seed identifies the batch as its index in
        the epoch does, and a resumed run seeds each batch as the uninterrupted run did. The rank
        makes the ranks' views differ. Reading the keys here costs no device synchronisation.
        """
        if self.views_on_device and _is_keyed_batch(batch):
            volumes, epochs, indices = batch
            keys = [int(epochs[0]), self._rank(), *(int(i) for i in indices.tolist())]
            return VolumeBatch(volumes, _mix_seed(self.seed, *keys))
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``views_on_device``, turn volumes ``(B, C, D, H, W)`` into the list of views.

        :class:`~nidl_dino.views.device.DeviceViews` makes them in batched operations on the
        device, with a generator on the device seeded by :meth:`on_before_batch_transfer`.
        """
        if isinstance(batch, VolumeBatch):
            return self.device_views(batch.volumes, batch.seed)
        if self.views_on_device and isinstance(batch, torch.Tensor) and batch.ndim == 5:
            # volumes without keys (a loader of the user's): seeded from (seed, rank) alone
            return self.device_views(batch, _mix_seed(self.seed, self._rank()))
        return batch

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0


def _is_keyed_batch(batch: Any) -> bool:
    return (
        isinstance(batch, (list, tuple))
        and len(batch) == 3
        and isinstance(batch[0], torch.Tensor)
        and batch[0].ndim == 5
        and isinstance(batch[1], torch.Tensor)
        and isinstance(batch[2], torch.Tensor)
    )
