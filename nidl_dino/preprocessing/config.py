"""Preprocessing settings: the defaults (the ``preprocessing:`` section of config.yaml) and merging.

Every step can be switched off; the trade-offs are written next to each knob in config.yaml; the
defaults are the schema's (:mod:`nidl_dino.settings`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nidl_dino.errors import UserError
from nidl_dino.settings import defaults

#: Defaults of every preprocessing knob, read from the schema (``nidl_dino/config.schema.yaml``,
#: the one place they are stated; config.yaml explains each knob). ``config.yaml``'s
#: ``preprocessing:`` section overrides any subset of them (nested keys merge, lists and scalars
#: replace).
DEFAULT_CONFIG: dict[str, Any] = defaults("preprocessing")

_METHODS = ("percentile", "zscore", "none")
_TRANSFORMS = ("Rigid", "Similarity", "Affine")


def merge_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge a (partial, nested) preprocessing config over :data:`DEFAULT_CONFIG`.

    Args:
        config: the ``preprocessing:`` section of config.yaml, or any subset of it.

    Returns:
        A new nested dict with every knob set.

    Raises:
        UserError: an unknown key or an invalid value, named with its dotted path.
    """
    merged = copy.deepcopy(DEFAULT_CONFIG)
    _merge_into(merged, config or {}, "preprocessing")
    _check(merged)
    return merged


#: Keys that existed once, with what to do instead (a clearer error than "unknown").
_REMOVED = {
    "preprocessing.qc.brain_volume_ml": (
        "was removed: the template's brain mask times the registration's scaling measured the "
        "template, not the subject; the head size is now the metrics.etiv_ml covariate (no bound)"
    ),
}


#: Mappings that null turns off as a whole.
_NULLABLE = {"preprocessing.qc.max_optimum_offset"}


def _merge_into(base: dict, update: Mapping, path: str) -> None:
    for key, value in update.items():
        if f"{path}.{key}" in _REMOVED:
            raise UserError(f"config key {path}.{key} {_REMOVED[f'{path}.{key}']}; delete it")
        if key not in base:
            known = ", ".join(sorted(base))
            raise UserError(f"config key {path}.{key} is unknown; expected one of: {known}")
        if isinstance(base[key], dict):
            if value is None and f"{path}.{key}" in _NULLABLE:
                base[key] = None
                continue
            if not isinstance(value, Mapping):
                raise UserError(f"config key {path}.{key} must be a mapping, got {value!r}")
            _merge_into(base[key], value, f"{path}.{key}")
        else:
            base[key] = copy.deepcopy(value)


def _check(cfg: dict) -> None:
    def fail(key: str, message: str) -> None:
        raise UserError(f"config key preprocessing.{key} {message}")

    if cfg["skull_stripped"] not in ("auto", True, False):
        fail("skull_stripped", "must be auto, true or false")
    if cfg["registration"]["type"] not in _TRANSFORMS:
        fail("registration.type", f"must be one of {', '.join(_TRANSFORMS)}")
    if cfg["normalization"]["method"] not in _METHODS:
        fail("normalization.method", f"must be one of {', '.join(_METHODS)}")
    low, high = cfg["normalization"]["percentiles"]
    if not 0 <= low < high <= 100:
        fail("normalization.percentiles", "must be [low, high] with 0 <= low < high <= 100")
    reg = cfg["registration"]
    for section, key in ((reg, "registration"), (reg["rigid_first"], "registration.rigid_first")):
        levels = {len(section[k]) for k in ("iterations", "shrink_factors", "smoothing_sigmas_vox")}
        if len(levels) != 1:
            fail(key, "needs iterations, shrink_factors and smoothing_sigmas_vox of equal length")
    if float(cfg["resample"]["spacing_mm"]) <= 0 or float(cfg["working_spacing_mm"]) <= 0:
        fail("resample.spacing_mm", "and working_spacing_mm must be positive")
    if len(cfg["resample"]["fov_mm"]) != 3 or len(cfg["resample"]["center_mm"]) != 3:
        fail("resample", "fov_mm and center_mm need three values (x, y, z)")
    if cfg["resample"]["order"] not in (0, 1, 3):
        fail("resample.order", "must be 0 (nearest), 1 (linear) or 3 (cubic)")
