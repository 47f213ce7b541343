"""The teacher file: its format, saving, weights-only loading and the encoder it names.

``teacher.pt`` holds only tensors and plain values and loads with
``torch.load(weights_only=True)``: opening it never executes code from the file. The encoder's
code comes from the installed package (a registry name) or from the import path recorded in it,
and only a class of ``nn.Module`` is ever built from such a path.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nidl_dino.atomic import atomic_path
from nidl_dino.errors import UserError

#: The ``format`` field of every teacher file this version writes and reads.
TEACHER_FORMAT = "nidl-dino-teacher/1"


def weights_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a state dict: names and float32 bytes, in sorted name order.

    The model id holds its first 12 digits, so a damaged file (changed weights) is detected.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    return digest.hexdigest()


def save_teacher(
    teacher: nn.Module,
    encoder_spec: Any,
    path: str | os.PathLike,
    image_size: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Save the teacher backbone with what is needed to rebuild it; return its model id.

    The model id is ``dino-<encoder name>-<first 12 hex digits of the weights' SHA-256>``, so a
    feature table says exactly which weights produced it.
    """
    state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    spec = _plain_spec(encoder_spec)
    name = str(spec["name"]).replace(":", ".").split(".")[-1]
    model_id = f"dino-{name}-{weights_digest(state)[:12]}"
    payload = {
        "format": TEACHER_FORMAT,
        "model_id": model_id,
        "encoder": spec,
        "image_size": image_size,
        "output_dim": int(getattr(teacher, "output_dim", 0) or 0),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return model_id


def load_teacher(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a teacher saved by :func:`save_teacher`, weights-only.

    Returns:
        ``(encoder, info)``: the encoder in eval mode, and the file's metadata (model_id,
        encoder spec, output_dim, ...).

    Raises:
        UserError: a missing, unreadable or foreign file.
    """
    from nidl_dino.encoders.networks import build_encoder

    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file {path} does not exist: run the train rule first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        reason = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{path} is not a loadable nidl-dino teacher file ({reason}): re-run training"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise UserError(f"{path} is not a nidl-dino teacher file: re-run training")
    spec = payload.get("encoder")
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    if not _names_encoder_class(name):
        # A weights-only file can still name any importable callable: only build classes.
        raise UserError(
            f"{path} names the encoder {str(name)[:100]!r}, which is neither a registry name nor "
            "an nn.Module class: re-run training"
        )
    encoder = build_encoder(spec, in_channels=1, image_size=None)
    encoder.load_state_dict(payload["state_dict"])
    encoder.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return encoder, info


def random_encoder_like(info: Mapping[str, Any], seed: int = 0) -> nn.Module:
    """The teacher's architecture (``info`` of :func:`load_teacher`) with freshly initialised
    weights, seeded as training seeds its encoder: DINO's starting point, in eval mode."""
    from nidl_dino.encoders.networks import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = build_encoder(info["encoder"], in_channels=1, image_size=None)
    return encoder.eval()


def _names_encoder_class(name: Any) -> bool:
    """True for a registry name or an import path of an ``nn.Module`` subclass."""
    from nidl_dino.encoders.networks import ENCODERS
    from nidl_dino.importing import import_object

    if not isinstance(name, str):
        return False
    if name in ENCODERS:
        return True
    try:
        obj = import_object(name)
    except UserError:
        return False
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def _plain_spec(spec: Any) -> dict[str, Any]:
    """The encoder spec as plain values ({name, kwargs}) so the teacher file loads weights-only."""
    from nidl_dino.importing import import_path_of

    if isinstance(spec, str):
        return {"name": spec, "kwargs": {}}
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            path = import_path_of(name)
            if path is None:
                raise UserError("encoder.name must be a registry name or an import path string")
            name = path
        return {"name": name, "kwargs": dict(spec.get("kwargs", {}) or {})}
    path = import_path_of(type(spec)) if isinstance(spec, nn.Module) else import_path_of(spec)
    if path is None:
        raise UserError(
            "the encoder cannot be saved by reference: use a registry name or an importable class"
        )
    return {"name": path, "kwargs": {}}
