"""Loud GPU failures and the device-dependent Trainer options (nidl_dino.training.devices)."""

from __future__ import annotations

import pytest
import torch

from nidl_dino.errors import UserError
from nidl_dino.training.devices import (
    DEFAULT_LOG_EVERY_N_STEPS,
    allocated_gpus,
    check_gpu,
    device_count,
    trainer_options,
)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({"SLURM_GPUS_ON_NODE": "1"}, "SLURM_GPUS_ON_NODE=1"),
    ],
)
def test_allocated_gpus_reads_slurm_and_cuda_variables(environ, expected):
    assert allocated_gpus(environ) == expected


@no_gpu
@pytest.mark.parametrize(
    "accelerator, environ, named",
    [
        ("gpu", {}, "trainer.accelerator is 'gpu'"),
        ("cuda", {}, "trainer.accelerator is 'cuda'"),
        ("auto", {"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0 says GPUs were allocated"),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ],
)
def test_a_gpu_run_without_a_usable_gpu_fails_in_one_line(accelerator, environ, named):
    with pytest.raises(UserError) as err:
        check_gpu(accelerator, environ)
    message = str(err.value)
    assert "\n" not in message
    assert named in message
    assert f"torch {torch.__version__}" in message
    assert "torch.cuda.is_available() is False" in message
    assert (torch.version.cuda or "CPU-only build") in message
    with pytest.raises(UserError, match="is_available"):  # through the training entry point
        trainer_options({"accelerator": accelerator}, environ)


@no_gpu
def test_cpu_and_plain_auto_runs_go_on():
    assert check_gpu("cpu", {"SLURM_JOB_GPUS": "0"}) is False  # the user chose the CPU
    assert check_gpu("auto", {}) is False


def test_deterministic_true_maps_to_warn_only_and_strict_to_raise():
    assert trainer_options({"accelerator": "cpu", "deterministic": True}, {})["deterministic"] == (
        "warn"
    )
    assert (
        trainer_options({"accelerator": "cpu", "deterministic": "strict"}, {})["deterministic"]
        is True
    )
    assert (
        trainer_options({"accelerator": "cpu", "deterministic": False}, {})["deterministic"]
        is False
    )


def test_cpu_defaults_log_interval_and_no_gpu_only_options():
    options = trainer_options({"accelerator": "cpu", "devices": 2}, {})
    assert options["log_every_n_steps"] == DEFAULT_LOG_EVERY_N_STEPS > 1
    assert "benchmark" not in options  # cudnn only
    assert "sync_batchnorm" not in options  # torch's SyncBatchNorm has no CPU kernel
    assert (
        trainer_options({"accelerator": "cpu", "log_every_n_steps": 3}, {})["log_every_n_steps"]
        == 3
    )


def test_gpu_options_benchmark_and_sync_batchnorm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options = trainer_options({"accelerator": "gpu", "devices": 2}, {})
    assert options["benchmark"] is True and options["sync_batchnorm"] is True
    single = trainer_options({"accelerator": "gpu", "devices": 1, "deterministic": True}, {})
    assert single["benchmark"] is False and "sync_batchnorm" not in single


def test_slurm_job_with_fewer_tasks_than_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_GPUS": "0,1"}
    with pytest.raises(UserError, match="2 processes per node.*1 task"):
        trainer_options({"accelerator": "gpu", "devices": 2}, slurm)
    ok = {**slurm, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}
    assert trainer_options({"accelerator": "gpu", "devices": 2}, ok)["sync_batchnorm"] is True


@pytest.mark.parametrize(
    "devices, expected", [(1, 1), (2, 2), ("2", 2), ([0, 1], 2), ("0,1", 2), ("auto", None)]
)
def test_device_count(devices, expected):
    assert device_count(devices) == (expected or max(1, torch.cuda.device_count()))


@no_gpu
def test_training_asked_for_a_gpu_stops_before_writing_anything(tmp_path, monkeypatch):
    from nidl_dino.training.run import train_from_config

    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    config = {"trainer": {"accelerator": "auto"}, "seed": 0}
    with pytest.raises(UserError, match="SLURM_JOB_GPUS=0 says GPUs were allocated"):
        train_from_config(["a.nii", "b.nii"], config, tmp_path / "work", tmp_path / "t.pt")
    assert not (tmp_path / "work").exists()
