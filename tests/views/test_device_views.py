"""Views made on the device (data.views_on_device): formulas, seeding, resume, no host syncs.

Run on the CPU device: the code is device-agnostic, and what matters here (which random numbers
are drawn, from which seed, and that nothing reads a tensor back to the host) is the same there.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from nidl_dino.encoders.networks import build_encoder
from nidl_dino.training.data import DINODataModule, VolumeBatch
from nidl_dino.views.crops import MultiCropTransform
from nidl_dino.views.device import DeviceViews

from dino_fixtures import noise_volumes, tiny_dino

torch.set_num_threads(1)

PLAIN = {  # crops only: intensity changes and flips off
    "global_size": 16,
    "local_size": 8,
    "num_local_crops": 2,
    "global_scale": [0.4, 1.0],
    "local_scale": [0.05, 0.05],
    "flip": {"prob": 0.0},
    "intensity": {"smooth": {"prob": [0, 0, 0]}, "noise": {"prob": [0, 0, 0]}},
}
EVERYTHING = {  # every random change on, each drawn half of the time
    "global_size": 16,
    "local_size": 8,
    "num_local_crops": 2,
    "global_scale": [0.4, 1.0],
    "local_scale": [0.05, 0.2],
    "aspect_ratio": [0.8, 1.25],
    "flip": {"prob": 0.5, "axes": [0, 1, 2]},
    "affine": {"prob": 0.5, "rotate_deg": 10.0, "scale": 0.1},
    "intensity": {
        "bias_field": {"prob": [0.5, 0.5, 0.5]},
        "gamma": {"prob": [0.5, 0.5, 0.5]},
        "smooth": {"prob": [0.5, 0.5, 0.5]},
        "noise": {"prob": [0.5, 0.5, 0.5]},
    },
}


def ramp(batch=3, shape=(20, 20, 20)) -> torch.Tensor:
    return torch.arange(batch * int(np.prod(shape)), dtype=torch.float32).reshape(batch, 1, *shape)


def test_shapes_dtype_and_seeding():
    views = DeviceViews(MultiCropTransform(**EVERYTHING))
    volumes = torch.randn(3, 1, 20, 20, 20)
    first = views(volumes, seed=0)
    assert [tuple(v.shape) for v in first] == [(3, 1, 16, 16, 16)] * 2 + [(3, 1, 8, 8, 8)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in first)
    again = views(volumes, seed=0)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    other = views(volumes, seed=1)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[2], first[3])  # two local views of one volume differ


def test_an_unresized_crop_is_the_slice_of_its_box():
    # local crops of 8^3 at 0.064 = (8/20)^3 of the volume: no resizing, exact voxel values
    views = DeviceViews(MultiCropTransform(**{**PLAIN, "local_scale": [0.064, 0.064]}))
    volumes = ramp()
    out = views(volumes, seed=3)
    for view, box in zip(out[2:], views.last_boxes[2:], strict=True):
        for b in range(3):
            start = box["start"][b].long().tolist()
            assert box["sides"][b].tolist() == [8, 8, 8]
            z, y, x = start
            expected = volumes[b, :, z : z + 8, y : y + 8, x : x + 8]
            assert torch.allclose(view[b], expected, rtol=1e-6, atol=1e-5)  # float rounding


def test_a_whole_volume_crop_resized_matches_trilinear_interpolation():
    views = DeviceViews(MultiCropTransform(**{**PLAIN, "global_scale": [1.0, 1.0]}))
    volumes = torch.randn(2, 1, 20, 20, 20)
    out = views(volumes, seed=0)
    expected = torch.nn.functional.interpolate(
        volumes, size=(16, 16, 16), mode="trilinear", align_corners=False
    )
    assert torch.allclose(out[0], expected, atol=1e-5)


def test_flips_reverse_the_axis():
    plain = DeviceViews(MultiCropTransform(**{**PLAIN, "global_scale": [1.0, 1.0]}))
    flip = {**PLAIN, "global_scale": [1.0, 1.0], "flip": {"prob": 1.0, "axes": [0]}}
    flipped = DeviceViews(MultiCropTransform(**flip))
    volumes = torch.randn(2, 1, 16, 16, 16)  # resized to its own size: the voxels themselves
    assert torch.allclose(plain(volumes, 0)[0], volumes, atol=1e-5)
    assert torch.allclose(flipped(volumes, 0)[0], volumes.flip(2), atol=1e-5)
    assert not torch.allclose(flipped(volumes, 0)[0], volumes, atol=1e-2)


def test_noise_and_smoothing_follow_their_formulas():
    # noise only, always drawn: the added field's std is fraction * the view's std, fraction in
    # [0, std]; smoothing only, sigma fixed at 1 voxel: a normalised sampled Gaussian
    cfg = {**PLAIN, "global_scale": [1.0, 1.0], "num_local_crops": 0}
    noisy = DeviceViews(
        MultiCropTransform(
            **{**cfg, "intensity": {**PLAIN["intensity"], "noise": {"prob": [1, 1, 1], "std": 0.5}}}
        )
    )
    volumes = torch.randn(4, 1, 16, 16, 16) * 3 + 1
    diff = noisy(volumes, 0)[0] - volumes
    ratio = diff.std(dim=(1, 2, 3, 4)) / volumes.std(dim=(1, 2, 3, 4))
    assert (ratio > 0).all() and (ratio < 0.5 * 1.1).all()
    smooth = {"prob": [1, 1, 1], "sigma": [1.0, 1.0]}
    blurred = DeviceViews(
        MultiCropTransform(**{**cfg, "intensity": {**PLAIN["intensity"], "smooth": smooth}})
    )
    impulse = torch.zeros(1, 1, 16, 16, 16)
    impulse[0, 0, 8, 8, 8] = 1.0
    out = blurred(impulse, 0)[0][0, 0]
    x = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-(x**2) / 2)
    g = g / g.sum()
    expected = g[:, None, None] * g[None, :, None] * g[None, None, :]
    assert torch.allclose(out[4:13, 4:13, 4:13], expected, atol=1e-6)


FORBIDDEN = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def test_device_views_never_read_a_tensor_back_to_the_host(monkeypatch):
    views = DeviceViews(MultiCropTransform(**EVERYTHING))
    volumes = torch.randn(3, 1, 20, 20, 20)
    views(volumes, seed=0)  # caches (Legendre bases) built outside the checked call as well

    def refuse(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called by the views")

        return raising

    for name in FORBIDDEN:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    out = views(volumes, seed=1)
    fresh = DeviceViews(MultiCropTransform(**EVERYTHING))(volumes, seed=1)  # cold caches too
    monkeypatch.undo()
    assert all(torch.equal(u, v) for u, v in zip(out, fresh, strict=True))


def test_local_crops_in_the_brain_are_centred_on_a_non_zero_voxel():
    volumes = torch.zeros(3, 1, 20, 20, 20)
    volumes[0, 0, 8:12, 6:10, 9:13] = 1.0
    volumes[1, 0, 5:9, 10:15, 6:11] = 2.0
    # volume 2 has no non-zero voxel: its crops fall back to uniform positions
    views = DeviceViews(MultiCropTransform(**{**PLAIN, "num_local_crops": 6}, local_in_brain=True))
    for seed in range(5):
        out = views(volumes, seed=seed)
        for view, box in zip(out[2:], views.last_boxes[2:], strict=True):
            for b in range(3):
                start, sides = box["start"][b], box["sides"][b]
                assert bool((start >= 0).all() and (start + sides <= 20).all())
                if b < 2:  # sides 7 and a box 5+ voxels from the edges: no shift at an edge
                    z, y, x = (start + torch.floor(sides / 2)).long().tolist()
                    assert volumes[b, 0, z, y, x] != 0
                    assert view[b].abs().sum() > 0
    global_boxes = views.last_boxes[:2]
    anywhere = DeviceViews(MultiCropTransform(**{**PLAIN, "num_local_crops": 6}))
    anywhere(volumes, seed=4)
    for mine, theirs in zip(global_boxes, anywhere.last_boxes[:2], strict=True):
        assert torch.equal(mine["start"], theirs["start"])  # global views are not moved


def test_local_crops_in_the_brain_never_read_a_tensor_back_to_the_host(monkeypatch):
    views = DeviceViews(MultiCropTransform(**EVERYTHING, local_in_brain=True))
    volumes = torch.randn(3, 1, 20, 20, 20).clamp_min(0)
    for name in FORBIDDEN:
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync"))
    out = views(volumes, seed=1)
    monkeypatch.undo()
    assert len(out) == 4 and all(torch.isfinite(v).all() for v in out)


# ---------------------------------------------------------------- through the datamodule


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    return noise_volumes(tmp_path_factory.mktemp("volumes"), 6, 20)


def device_batch(dm: DINODataModule, rank: int, epoch: int = 0) -> list[torch.Tensor]:
    dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=epoch)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    moved = dm.on_before_batch_transfer(batch, 0)
    assert isinstance(moved, VolumeBatch) and isinstance(moved.seed, int)
    return dm.on_after_batch_transfer(moved, 0)


def test_ranks_draw_different_views_of_the_same_batch(paths):
    dm = DINODataModule(paths, EVERYTHING, batch_size=2, views_on_device=True, seed=0)
    rank0 = device_batch(dm, rank=0)
    rank0_again = device_batch(dm, rank=0)
    rank1 = device_batch(dm, rank=1)
    assert all(torch.equal(u, v) for u, v in zip(rank0, rank0_again, strict=True))
    assert all(not torch.equal(u, v) for u, v in zip(rank0, rank1, strict=True))
    epoch1 = device_batch(dm, rank=0, epoch=1)
    assert not torch.equal(rank0[0], epoch1[0])


class RecordViews(Callback):
    def __init__(self):
        self.seen: list[tuple[int, list[torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, [v.clone() for v in batch]))


def train(paths, folder, max_epochs=2, ckpt_path=None):
    dm = DINODataModule(paths, EVERYTHING, batch_size=2, views_on_device=True, seed=0)
    encoder = build_encoder(
        {"name": "small_cnn", "kwargs": {"channels": [4, 8]}}, image_size=dm.image_sizes
    )
    recorder = RecordViews()
    model = tiny_dino(
        encoder,
        dm.num_local_crops,
        max_epochs=max_epochs,
        enable_checkpointing=True,
        callbacks=[
            recorder,
            ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ],
        default_root_dir=str(folder),
    )
    model.fit(None, datamodule=dm, ckpt_path=ckpt_path)
    return model, recorder.seen


def test_a_resumed_run_draws_and_ends_as_the_uninterrupted_run(paths, tmp_path):
    full, seen = train(paths, tmp_path / "full")
    epochs = [e for e, _ in seen]
    assert epochs == [0, 0, 0, 1, 1, 1]  # 6 volumes, batches of 2, 2 epochs
    # epoch 1 does not replay epoch 0's views
    assert not torch.equal(seen[0][1][0], seen[3][1][0])
    resumed, seen_resumed = train(
        paths, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "epoch=0.ckpt")
    )
    assert [e for e, _ in seen_resumed] == [1, 1, 1]
    for (_, views), (_, again) in zip(seen[3:], seen_resumed, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(views, again, strict=True))
    for a, b in zip(
        full.teacher.state_dict().values(), resumed.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(full.loss.center, resumed.loss.center)


def test_device_views_change_the_resume_fingerprint_only_when_on():
    from nidl_dino.training.run import training_fingerprint

    base = {"seed": 0, "data": {"batch_size": 2}}
    paths = ["a.nii", "b.nii"]
    plain = training_fingerprint(base, paths)
    assert training_fingerprint({**base, "data": {"batch_size": 2, "views_on_device": False}},
                                paths) == plain  # fmt: skip
    assert training_fingerprint({**base, "data": {"batch_size": 2, "views_on_device": True}},
                                paths) != plain  # fmt: skip


def test_float64_volumes_give_float64_views():
    out = DeviceViews(MultiCropTransform(**EVERYTHING))(torch.randn(2, 1, 20, 20, 20).double(), 0)
    assert {v.dtype for v in out} == {torch.float64}
