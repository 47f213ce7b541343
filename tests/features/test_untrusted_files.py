"""Opening a teacher file or a checkpoint never runs code from the file.

Our files hold tensors and plain values only, so they load with ``torch.load(weights_only=True)``;
a file whose unpickling would run code (``__reduce__``), or which names a function to call in
place of an encoder class, is refused before anything runs: the tests watch a sentinel file that
the attack would create.
"""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import shlex
import threading

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from nidl_dino import DINO
from nidl_dino.encoders.networks import build_encoder
from nidl_dino.errors import UserError
from nidl_dino.features.teacher import TEACHER_FORMAT, load_teacher, save_teacher

from dino_fixtures import SMALL_HEAD, TinyConv3d, views_loader


class RunsShell:
    """Unpickling this object runs ``touch <path>`` (the classic pickle attack)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def malicious_files(folder, sentinel):
    """A torch.save (zip) file and a plain pickle, both carrying the attack."""
    payload = {"format": TEACHER_FORMAT, "state_dict": {}, "extra": RunsShell(sentinel)}
    zipped, plain = folder / "evil.pt", folder / "evil.pkl"
    torch.save(payload, zipped)
    with open(plain, "wb") as f:
        pickle.dump(payload, f, protocol=2)  # torch.load's own protocol
    return [zipped, plain]


def one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def fitted_checkpoint(tmp_path, quiet_trainer_kwargs):
    def fit(encoder, **kwargs):
        folder = tmp_path / f"ckpt-{len(list(tmp_path.glob('ckpt-*')))}"
        model = DINO(
            encoder,
            num_local_crops=2,
            max_steps=2,
            random_state=0,
            **{**SMALL_HEAD, **kwargs},
            **{
                **quiet_trainer_kwargs,
                "enable_checkpointing": True,
                "callbacks": [ModelCheckpoint(folder, save_last=True)],
            },
        )
        model.fit(views_loader())
        return model, folder / "last.ckpt"

    return fit


def test_the_attack_works_when_loaded_unsafely(tmp_path):
    # the test can fail: the same files do run code when unpickled in full
    control = tmp_path / "control"
    for path in malicious_files(tmp_path, control):
        control.unlink(missing_ok=True)
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:  # a plain pickle runs, then fails torch's magic-number check
            pass
        assert control.exists()


def test_teacher_file_loads_weights_only(tmp_path):
    encoder = build_encoder({"name": "small_cnn", "kwargs": {"channels": [4, 8]}})
    path = tmp_path / "teacher.pt"
    spec = {"name": "small_cnn", "kwargs": {"channels": [4, 8]}}
    model_id = save_teacher(encoder, spec, path, image_size=[[16] * 3, [8] * 3])
    payload = torch.load(path, weights_only=True)
    assert payload["model_id"] == model_id and payload["encoder"] == spec
    loaded, info = load_teacher(path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert info["model_id"] == model_id


def test_lightning_checkpoints_load_weights_only(fitted_checkpoint):
    for encoder, kwargs in (
        (TinyConv3d, {"encoder_kwargs": {"dim": 8}}),
        ("small_cnn", {"encoder_kwargs": {"channels": [4, 8]}}),
    ):
        model, path = fitted_checkpoint(encoder, **kwargs)
        checkpoint = torch.load(path, weights_only=True)
        assert isinstance(checkpoint["hyper_parameters"]["encoder"], str)
        loaded = DINO.load_from_checkpoint(path, weights_only=True)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_workflow_checkpoint_loads_weights_only(tmp_path):
    import nibabel as nib
    import numpy as np

    from nidl_dino.training.run import train_from_config

    rng = np.random.default_rng(0)
    volumes = []
    for i in range(4):
        volumes.append(str(tmp_path / f"v{i}.nii.gz"))
        nib.save(
            nib.Nifti1Image(rng.standard_normal((20,) * 3).astype(np.float32), np.eye(4)),
            volumes[-1],
        )
    config = {
        "encoder": {"name": "small_cnn", "kwargs": {"channels": [4, 8]}},
        "views": {"global_size": [16] * 3, "local_size": [8] * 3, "num_local_crops": 2},
        "data": {"batch_size": 2},
        "dino": {"proj_hidden_dim": 16, "proj_bottleneck_dim": 8, "proj_output_dim": 32},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False},
    }
    work = tmp_path / "work"
    train_from_config(volumes, config, work, tmp_path / "teacher.pt")
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(work / "checkpoints" / name, weights_only=True)
        assert checkpoint["global_step"] == 2
    torch.load(tmp_path / "teacher.pt", weights_only=True)
    encoder = build_encoder(config["encoder"], image_size=[[16] * 3, [8] * 3])
    loaded = DINO.load_from_checkpoint(
        work / "checkpoints" / "last.ckpt", weights_only=True, encoder=encoder
    )
    assert loaded.fitted


def test_load_teacher_refuses_a_malicious_pickle(tmp_path):
    sentinel = tmp_path / "sentinel"
    for path in malicious_files(tmp_path, sentinel):
        with pytest.raises(UserError, match="is not a loadable nidl-dino teacher file") as e:
            load_teacher(path)
        assert str(path) in one_line(e)
        assert not sentinel.exists()


def test_load_from_checkpoint_and_resume_refuse_a_malicious_pickle(
    tmp_path, monkeypatch, quiet_trainer_kwargs
):
    sentinel = tmp_path / "sentinel"
    for path in malicious_files(tmp_path, sentinel):
        with pytest.raises(pickle.UnpicklingError):
            DINO.load_from_checkpoint(path, weights_only=True)
        with pytest.raises(pickle.UnpicklingError):
            DINO.load_from_checkpoint(path)  # the default is weights-only too
        model = DINO(
            TinyConv3d,
            encoder_kwargs={"dim": 8},
            num_local_crops=2,
            max_steps=1,
            **SMALL_HEAD,
            **quiet_trainer_kwargs,
        )
        with pytest.raises(pickle.UnpicklingError):
            model.fit(views_loader(), ckpt_path=str(path))
        # even where torch's own default was turned off, resuming stays weights-only
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        with pytest.raises(pickle.UnpicklingError):
            model.fit(views_loader(), ckpt_path=str(path))
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        assert not sentinel.exists()


def test_load_from_checkpoint_refuses_a_malicious_url(tmp_path, monkeypatch):
    # Lightning's own default loads URLs with full unpickling
    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "served"
    folder.mkdir()
    malicious_files(folder, sentinel)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # the download cache
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/evil.pt"
        with pytest.raises(pickle.UnpicklingError):
            DINO.load_from_checkpoint(url)
    finally:
        server.shutdown()
        server.server_close()
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["os:system", "os.system"])
def test_load_teacher_refuses_a_function_named_as_encoder(tmp_path, name):
    # A weights-only file can still name any importable callable as its "encoder class".
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "teacher.pt"
    payload = {
        "format": TEACHER_FORMAT,
        "model_id": "dino-x-0",
        "encoder": {"name": name, "kwargs": {"command": f"touch {sentinel}"}},
        "image_size": None,
        "output_dim": 8,
        "state_dict": {},
        "extra": {},
    }
    torch.save(payload, path)
    with pytest.raises(UserError) as e:
        load_teacher(path)
    assert str(path) in one_line(e)
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["os:system", "os.system"])
def test_load_from_checkpoint_refuses_a_function_named_as_encoder(
    tmp_path, fitted_checkpoint, name
):
    _, path = fitted_checkpoint(TinyConv3d, encoder_kwargs={"dim": 8})
    checkpoint = torch.load(path, weights_only=True)
    sentinel = tmp_path / "sentinel"
    checkpoint["hyper_parameters"]["encoder"] = name
    checkpoint["hyper_parameters"]["encoder_kwargs"] = {"command": f"touch {sentinel}"}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises((UserError, TypeError, ValueError)) as e:
        DINO.load_from_checkpoint(tmp_path / "evil.ckpt", weights_only=True)
    one_line(e)
    assert not sentinel.exists()
