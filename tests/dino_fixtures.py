"""Tiny encoders and view datasets for the DINO tests (importable helpers, not tests)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TinyConv3d(nn.Module):
    """A 3D conv encoder small enough for a CPU test: (B, 1, D, H, W) -> (B, dim)."""

    def __init__(self, dim: int = 8, channels: int = 4):
        super().__init__()
        self.output_dim = dim
        self.net = nn.Sequential(
            nn.Conv3d(1, channels, 3, stride=2, padding=1),
            nn.BatchNorm3d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(channels, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FlattenLinear(nn.Module):
    """Flatten then Linear: views of any spatial size are average-pooled to 4^3 first."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.output_dim = dim
        self.pool = nn.AdaptiveAvgPool3d(4)
        self.linear = nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x).flatten(1))


class RandomViews(Dataset):
    """Deterministic random views: item i -> [g1, g2, l1..lN] (or ([views], label))."""

    def __init__(self, n=16, n_local=2, global_size=12, local_size=6, with_targets=False):
        self.n, self.n_local = n, n_local
        self.gs, self.ls = global_size, local_size
        self.with_targets = with_targets

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        views = [torch.randn(1, self.gs, self.gs, self.gs, generator=g) for _ in range(2)]
        views += [
            torch.randn(1, self.ls, self.ls, self.ls, generator=g) for _ in range(self.n_local)
        ]
        return (views, i) if self.with_targets else views


def views_loader(batch_size=4, **kwargs) -> DataLoader:
    return DataLoader(RandomViews(**kwargs), batch_size=batch_size, shuffle=False)


SMALL_HEAD = {
    "proj_input_dim": 8,
    "proj_hidden_dim": 16,
    "proj_bottleneck_dim": 8,
    "proj_output_dim": 32,
}


#: Trainer options of a silent test fit on the CPU (no logger, checkpoint, bar or summary).
QUIET_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def tiny_dino(encoder: nn.Module, num_local_crops: int, **options):
    """A DINO with a small head on ``encoder`` (its ``output_dim``), silent CPU trainer, seed 0.

    ``options``: more DINO or Trainer arguments, overriding these.
    """
    from nidl_dino import DINO

    head = {**SMALL_HEAD, "proj_input_dim": encoder.output_dim}
    settings = {"random_state": 0, **QUIET_TRAINER, **head, **options}
    return DINO(encoder, num_local_crops=num_local_crops, **settings)


def noise_volumes(
    folder: Path, n: int, size: int, name: str = "sub-{i:02d}_T1w.nii.gz", seed: int = 0
) -> list[str]:
    """``n`` cubes of standard normal noise (``size``^3, float32, identity affine) in ``folder``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = Path(folder) / name.format(i=i)
        data = rng.standard_normal((size, size, size)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        paths.append(str(path))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_env() -> dict[str, str]:
    """Environment of a multi-process gloo run on this machine's loopback.

    No inherited Slurm, torchrun or Lightning variables (they would decide the ranks), a free
    port, one thread per process; this checkout's package and these helpers importable.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
        and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
    }
    here = Path(__file__).resolve().parent
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(here.parent), str(here), env.get("PYTHONPATH")])
        ),
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: no network needed
    return env
