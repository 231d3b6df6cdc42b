"""Tiny deterministic fixture networks shared by several test files (importable: tests/ is on sys.path)."""
from __future__ import annotations

from torch import nn


class Tiny(nn.Module):
    """Three convs (a strided 3×3, a 3×3, a 1×1) and a linear head: 32-px inputs, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))
