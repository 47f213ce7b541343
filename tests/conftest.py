"""Shared test settings: one thread (the CI machine has 2 shared cores), quiet Lightning."""

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
torch.set_num_threads(1)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*val_dataloader.*Skipping val loop.*")


@pytest.fixture
def quiet_trainer_kwargs(tmp_path):
    """Trainer options for fast, silent CPU test runs writing only below tmp_path."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }


@pytest.fixture(scope="session")
def real_head():
    """Paths of mricron-data's ch2, ch2better, ch2bet and macaque volumes (see real_head.py).

    Skips (with the one-line reason) where apt/dpkg or the download is unavailable.
    """
    from real_head import Unavailable, mricron_files

    try:
        return mricron_files()
    except Unavailable as err:
        pytest.skip(f"no real head: {err}")
