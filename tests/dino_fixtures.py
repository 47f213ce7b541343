"""Tiny encoders and view datasets for the DINO tests (importable helpers, not tests)."""

from __future__ import annotations

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
