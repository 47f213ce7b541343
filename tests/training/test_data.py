"""Data loading: whole-volume loader, DINO datamodule (CPU and device views), caches, seeding."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from nidl_dino.errors import UserError
from nidl_dino.training.data import DINODataModule, VolumeDataset, volume_loader

from dino_fixtures import tiny_dino

torch.set_num_threads(1)

VIEWS = {"global_size": 16, "local_size": 8, "num_local_crops": 2}
SHAPE = (20, 20, 20)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> tuple[list[str], list[np.ndarray]]:
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    paths, arrays = [], []
    for i in range(5):
        array = rng.standard_normal(SHAPE).astype(np.float32)
        path = folder / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        paths.append(str(path))
        arrays.append(array)
    return paths, arrays


def first_batch(dm: DINODataModule):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_volume_loader_keeps_order_and_values(volumes):
    paths, arrays = volumes
    batches = list(volume_loader(paths, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 1, *SHAPE)] * 2 + [(1, 1, *SHAPE)]
    stacked = torch.cat(batches)
    assert stacked.dtype == torch.float32
    np.testing.assert_array_equal(stacked[:, 0].numpy(), np.stack(arrays))


def test_training_batches_are_views_globals_first(volumes):
    paths, _ = volumes
    batch = first_batch(DINODataModule(paths, VIEWS, batch_size=2, seed=0))
    assert isinstance(batch, list)
    assert [tuple(v.shape) for v in batch] == [(2, 1, 16, 16, 16)] * 2 + [(2, 1, 8, 8, 8)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch)


def test_drop_last_and_small_cohorts(volumes, caplog):
    paths, _ = volumes
    dm = DINODataModule(paths, VIEWS, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2  # 5 volumes, the odd one out is dropped
    with caplog.at_level(logging.WARNING):
        dm = DINODataModule(paths[:3], VIEWS, batch_size=8)
    assert dm.batch_size == 3 and "batch_size" in caplog.text
    assert len(dm.train_dataloader()) == 1
    with pytest.raises(UserError, match="at least 2 volumes"):
        DINODataModule(paths[:1], VIEWS, batch_size=2)


def test_bad_inputs_are_one_line_user_errors(volumes, tmp_path):
    paths, _ = volumes
    with pytest.raises(UserError, match="missing.nii.gz"):
        VolumeDataset([*paths, str(tmp_path / "missing.nii.gz")])
    with pytest.raises(UserError, match="data.cache"):
        DINODataModule(paths, VIEWS, cache="ram")
    with pytest.raises(UserError, match="cache_dir"):
        VolumeDataset(paths, cache="disk")
    with pytest.raises(UserError, match="views.local_size"):
        DINODataModule(paths, {"local_size": [8, 8]})


def test_caches_give_the_same_volumes(volumes, tmp_path):
    paths, arrays = volumes
    for cache in ("none", "memory", "disk", "disk"):  # disk twice: written, then read
        dataset = VolumeDataset(paths, cache=cache, cache_dir=tmp_path / "cache")
        for item, array in zip(dataset, arrays, strict=True):
            assert type(item) is torch.Tensor and item.dtype == torch.float32
            assert tuple(item.shape) == (1, *SHAPE)
            np.testing.assert_array_equal(item[0].numpy(), array)
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == len(paths)
    # uncompressed float32 arrays, readable memory-mapped: 4 bytes a voxel plus the header
    for path in cached:
        array = np.load(path, mmap_mode="r")
        assert isinstance(array, np.memmap) and array.dtype == np.float32
        assert path.stat().st_size <= 4 * np.prod(SHAPE) + 128


def test_disk_cache_reads_its_files_and_redoes_a_changed_source(volumes, tmp_path):
    import os
    import shutil

    from nidl_dino.training.volume_cache import NpyVolumeCache

    paths, arrays = volumes
    source = tmp_path / "sub-00_T1w.nii.gz"
    shutil.copy(paths[0], source)
    calls = []

    def load(path):
        calls.append(path)
        return VolumeDataset([path]).dataset[0]

    cache = NpyVolumeCache(tmp_path / "cache", load)
    first = cache(source)
    second = cache(source)
    assert calls == [str(source)] and torch.equal(first, second)
    # a re-preprocessed volume (new contents, new mtime) is decoded again
    nib.save(nib.Nifti1Image(arrays[1], np.eye(4)), source)
    os.utime(source, ns=(1, 1))
    np.testing.assert_array_equal(cache(source)[0].numpy(), arrays[1])
    assert len(calls) == 2


def test_auto_cache_is_memory_when_the_cohort_fits_else_disk(volumes, tmp_path):
    from nidl_dino.training.volume_cache import plan_volume_cache

    paths, _ = volumes
    nbytes = 4 * int(np.prod(SHAPE)) * len(paths)
    assert plan_volume_cache(paths, "auto", tmp_path / "c", memory_bytes=2 * nbytes) == "memory"
    assert plan_volume_cache(paths, "auto", tmp_path / "c", memory_bytes=nbytes) == "disk"
    dm = DINODataModule(paths, VIEWS, batch_size=2, cache="auto", cache_dir=tmp_path / "c")
    assert dm.cache == "memory"  # 5 x 32 kB fit any job
    dm = DINODataModule(
        paths, VIEWS, batch_size=2, cache="auto", cache_dir=tmp_path / "c", memory_mb=0.1
    )
    assert dm.cache == "disk"
    first_batch(dm)
    assert len(list((tmp_path / "c").glob("*.npy"))) >= 2


def test_a_disk_cache_too_large_for_its_folder_stops_before_training(
    volumes, tmp_path, monkeypatch
):
    import shutil
    from collections import namedtuple

    paths, _ = volumes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match=r"data.cache_dir .*needs .* free") as err:
        DINODataModule(paths, VIEWS, batch_size=2, cache="disk", cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="data.cache_dir"):
        DINODataModule(
            paths, VIEWS, batch_size=2, cache="auto", cache_dir=tmp_path / "c", memory_mb=0.1
        )
    # volumes already cached need no space
    monkeypatch.undo()
    VolumeDataset(paths, cache="disk", cache_dir=tmp_path / "c")[0]
    list(VolumeDataset(paths, cache="disk", cache_dir=tmp_path / "c"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    dm = DINODataModule(paths, VIEWS, batch_size=2, cache="disk", cache_dir=tmp_path / "c")
    assert dm.cache == "disk"


def test_cache_dir_expands_environment_variables(volumes, tmp_path, monkeypatch):
    paths, _ = volumes
    monkeypatch.setenv("NIDL_TEST_SCRATCH", str(tmp_path / "scratch"))
    VolumeDataset(paths[:1], cache="disk", cache_dir="$NIDL_TEST_SCRATCH/cache")[0]
    assert len(list((tmp_path / "scratch" / "cache").glob("*.npy"))) == 1
    monkeypatch.delenv("NIDL_TEST_SCRATCH")
    with pytest.raises(UserError, match="unset environment variable"):
        VolumeDataset(paths[:1], cache="disk", cache_dir="$NIDL_TEST_SCRATCH/cache")


def test_auto_workers_and_device_views(monkeypatch):
    import os

    from nidl_dino.training.data import resolve_num_workers, resolve_views_on_device

    assert resolve_num_workers("auto", threads=12) == 12
    assert resolve_num_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_num_workers(3, threads=12) == 3
    with pytest.raises(UserError, match="num_workers"):
        resolve_num_workers("many")
    assert resolve_views_on_device(True, "cpu") and not resolve_views_on_device(False, "gpu")
    assert resolve_views_on_device("auto", "gpu") and resolve_views_on_device("auto", "cuda")
    assert not resolve_views_on_device("auto", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not resolve_views_on_device("auto", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_views_on_device("auto", "auto")


def test_seeded_runs_repeat_and_seeds_differ(volumes):
    paths, _ = volumes
    a = first_batch(DINODataModule(paths, VIEWS, batch_size=2, seed=3, cache="memory"))
    b = first_batch(DINODataModule(paths, VIEWS, batch_size=2, seed=3))
    c = first_batch(DINODataModule(paths, VIEWS, batch_size=2, seed=4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_workers_draw_different_views_and_repeat_under_a_seed(volumes):
    # The same volume everywhere: identical batches from the two workers would mean both
    # workers share one random stream (the classic fork bug MONAI's worker_init_fn prevents).
    paths, _ = volumes
    same = [paths[0]] * 4

    def two_batches(seed):
        dm = DINODataModule(same, VIEWS, batch_size=2, num_workers=2, seed=seed)
        dm.setup("fit")
        return list(dm.train_dataloader())

    first, second = two_batches(0)
    assert not torch.equal(first[0], second[0])
    again = two_batches(0)
    for u, v in zip(first + second, again[0] + again[1], strict=True):
        assert torch.equal(u, v)


def test_views_on_device_turn_volume_batches_into_views(volumes):
    paths, _ = volumes
    dm = DINODataModule(paths, VIEWS, batch_size=2, views_on_device=True)
    volumes, epochs, indices = first_batch(dm)
    assert tuple(volumes.shape) == (2, 1, *SHAPE)  # whole volumes leave the loader, with keys
    assert epochs.tolist() == [0, 0] and len(set(indices.tolist())) == 2
    batch = dm.on_before_batch_transfer([volumes, epochs, indices], 0)
    views = dm.on_after_batch_transfer(batch, 0)
    assert [tuple(v.shape) for v in views] == [(2, 1, 16, 16, 16)] * 2 + [(2, 1, 8, 8, 8)] * 2
    assert dm.image_sizes == [(16, 16, 16), (8, 8, 8)] and dm.num_local_crops == 2


@pytest.mark.parametrize("views_on_device", [False, True])
def test_dino_trains_end_to_end_on_the_datamodule(volumes, views_on_device):
    from nidl_dino.encoders.networks import build_encoder

    paths, _ = volumes
    dm = DINODataModule(
        paths, VIEWS, batch_size=2, views_on_device=views_on_device, val_paths=paths[:2]
    )
    encoder = build_encoder(
        {"name": "small_cnn", "kwargs": {"channels": [4, 8, 16]}}, image_size=dm.image_sizes
    )
    model = tiny_dino(encoder, dm.num_local_crops, max_epochs=1)
    model.fit(None, datamodule=dm)
    features = model.transform(volume_loader(paths, batch_size=2))
    assert features.shape == (len(paths), 16)
    assert torch.isfinite(features).all()
