"""nidl-dino: DINO self-supervised features for 3D brain MRI.

``DINO``, ``DINOProjectionHead`` and ``DINOLoss`` are imported lazily, so that light entry points
(preprocessing, tables) do not pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["DINO", "DINOLoss", "DINOProjectionHead"]
__version__ = "0.1.0"

_EXPORTS = {
    "DINO": "nidl_dino.core.estimator",
    "DINOProjectionHead": "nidl_dino.core.head",
    "DINOLoss": "nidl_dino.core.loss",
}

if TYPE_CHECKING:  # pragma: no cover
    from nidl_dino.core.estimator import DINO
    from nidl_dino.core.head import DINOProjectionHead
    from nidl_dino.core.loss import DINOLoss


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nidl_dino' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
