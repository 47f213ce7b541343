"""The cache of preprocessed volumes between epochs: where it lives and how it is read.

Decoding a 128^3 ``.nii.gz`` costs about 47 ms per loader worker, far from the ~1 ms a GPU
training at 200 steps/s of batch 8 leaves to each of 16 workers. Two caches avoid it:

- ``memory``: MONAI's ``CacheDataset``, every volume decoded once into RAM (shared with the
  forked loader workers); needs the whole cohort in the job's memory (84 GB at 10k x 128^3).
- ``disk``: :class:`NpyVolumeCache`, one uncompressed ``.npy`` file per volume, written by the
  worker that decodes the volume first (atomically: workers and ranks may race) and read after
  that through a memory map: a copy out of the page cache, about a millisecond for 8 MB.

:func:`plan_volume_cache` resolves ``data.cache: auto`` (memory when the cohort takes at most half
of the job's memory, disk otherwise) and checks, before training starts, that a disk cache fits
the free space of its folder: one line naming ``data.cache_dir`` when it does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from nidl_dino.atomic import atomic_path
from nidl_dino.errors import UserError

__all__ = [
    "NpyVolumeCache",
    "cohort_nbytes",
    "job_memory_bytes",
    "plan_volume_cache",
    "resolve_cache_dir",
]

log = logging.getLogger(__name__)

#: Fraction of the job's memory the memory cache may take (the model, the loader workers'
#: batches and the views need the rest).
MEMORY_CACHE_FRACTION = 0.5
#: Bumped when the cached array changes for the same source file (the key includes it).
_CACHE_VERSION = "1"


class NpyVolumeCache:
    """Path -> volume tensor ``(C, D, H, W)``, through one ``.npy`` file per volume.

    The first call for a path decodes it with ``load`` and writes ``<key>.npy`` into
    ``cache_dir`` (a temporary name, then ``os.replace``: a concurrent reader sees the whole file
    or none); later calls, in any process, read it memory-mapped. The key hashes the source's
    absolute path, size and modification time, so a re-preprocessed volume is decoded again.
    The values are exactly those of ``load`` (float32 arrays are stored as they are).

    Args:
        cache_dir: folder of the ``.npy`` files (created).
        load: decodes a volume file into a tensor (e.g. MONAI ``LoadImage`` + ``EnsureType``).
    """

    def __init__(self, cache_dir: str | os.PathLike, load: Callable[[str], torch.Tensor]):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.load = load

    def path_of(self, path: str | os.PathLike) -> Path:
        """The cache file of a volume file (whether it exists or not)."""
        return self.cache_dir / f"{cache_key(path)}.npy"

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        target = self.path_of(path)
        try:
            array = np.load(target, mmap_mode="r")
        except (OSError, ValueError):  # not cached yet (or unreadable): decode and write
            return self._fill(str(path), target)
        # a copy: the tensor outlives the map, and torch wants writable memory
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))

    def _fill(self, path: str, target: Path) -> torch.Tensor:
        volume = self.load(path)
        try:  # a unique temporary name: concurrent workers may fill the same volume
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                np.save(handle, torch.as_tensor(volume).contiguous().numpy())
        except OSError as err:  # a full disk costs speed, not the run
            log.warning("volume cache: cannot write %s (%s); reading the source", target, err)
        return volume


def cache_key(path: str | os.PathLike) -> str:
    """Hex key of a volume file: its absolute path, size and modification time."""
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    text = f"{_CACHE_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:24]


def volume_nbytes(path: str | os.PathLike) -> int:
    """Bytes of one volume as float32 in memory (read from the header only)."""
    import nibabel as nib

    try:
        shape = nib.load(os.fspath(path)).header.get_data_shape()
    except Exception as err:  # noqa: BLE001 - any header failure: the path is named
        raise UserError(
            f"{path}: cannot read the volume header ({err}); rerun preprocessing"
        ) from None
    return int(np.prod(shape, dtype=np.int64)) * 4


def cohort_nbytes(paths: Sequence[str | os.PathLike]) -> int:
    """Bytes of all volumes as float32: the first volume's size times their number.

    Preprocessed volumes share one grid, so one header is enough (10k headers would cost
    seconds on a network file system).
    """
    return volume_nbytes(paths[0]) * len(paths) if paths else 0


def job_memory_bytes(mem_mb: float | None = None) -> int:
    """Memory this job may use: the smallest of ``mem_mb`` (the rule's resource), the cgroup
    limit (SLURM enforces ``--mem`` with it) and the machine's physical memory."""
    limits = []
    if mem_mb:
        limits.append(int(float(mem_mb) * 2**20))
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            limits.append(int(text))
        break
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    return min(limits) if limits else 2**40


def resolve_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """``data.cache_dir`` with ``~`` and environment variables (``$TMPDIR``) expanded.

    Raises:
        UserError: a variable that is not set.
    """
    text = os.path.expandvars(os.path.expanduser(os.fspath(cache_dir)))
    if "$" in text:
        raise UserError(
            f"data.cache_dir: {cache_dir!r} names an unset environment variable; set it or give "
            "a folder"
        )
    return Path(text)


def plan_volume_cache(
    paths: Sequence[str | os.PathLike],
    cache: str,
    cache_dir: str | os.PathLike | None,
    memory_bytes: int | None = None,
) -> str:
    """The cache mode to use (``none``/``memory``/``disk``), checked before training starts.

    ``auto`` is ``memory`` when the cohort (float32) takes at most
    :data:`MEMORY_CACHE_FRACTION` of ``memory_bytes`` (default: :func:`job_memory_bytes`), and
    ``disk`` otherwise. A disk cache must fit the free space of its folder, counting the files
    already cached.

    Raises:
        UserError: a disk cache without ``cache_dir``, or one that does not fit its disk (one
            line: what it needs, what is free, what to change).
    """
    if cache not in ("auto", "disk", "memory"):
        return cache
    total = cohort_nbytes(paths)
    memory = job_memory_bytes() if memory_bytes is None else int(memory_bytes)
    budget = int(MEMORY_CACHE_FRACTION * memory)
    if cache == "auto":
        cache = "memory" if total <= budget else "disk"
        log.info(
            "data.cache auto: %d volumes take %s, %s half of the job's %s memory: %s cache",
            len(paths),
            _gb(total),
            "within" if cache == "memory" else "over",
            _gb(memory),
            cache,
        )
    elif cache == "memory" and total > budget:
        log.warning(
            "data.cache memory: %d volumes take %s, over half of the job's %s memory; set "
            "data.cache: disk (or auto) if the job runs out of memory",
            len(paths),
            _gb(total),
            _gb(memory),
        )
    if cache == "disk":
        if cache_dir is None:
            raise UserError("data.cache_dir: needed for cache: disk; give a writable folder")
        folder = resolve_cache_dir(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        per_volume = volume_nbytes(paths[0]) + 128 if paths else 0  # + the .npy header
        cached = NpyVolumeCache(folder, load=_no_load)
        missing = sum(1 for p in paths if not cached.path_of(p).exists())
        needed = missing * per_volume
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise UserError(
                f"data.cache_dir {folder}: the disk cache needs {_gb(needed)} more "
                f"({missing} volumes), {_gb(free)} free; point data.cache_dir at a larger disk "
                "(e.g. a node's local $TMPDIR) or set data.cache: none"
            )
        log.info(
            "disk cache in %s: %d of %d volumes to write (%s), %s free",
            folder,
            missing,
            len(paths),
            _gb(needed),
            _gb(free),
        )
    return cache


def _no_load(path: str) -> torch.Tensor:  # pragma: no cover - never called
    raise AssertionError(path)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
