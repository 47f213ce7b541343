"""Import paths ("package.module:Name") for classes and callables named in configs and checkpoints.

Checkpoints keep hyperparameters as plain strings instead of pickled classes, so that they load
with ``torch.load(weights_only=True)``: opening a checkpoint never runs code from the file.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from nidl_dino.errors import UserError


def is_import_path(value: Any) -> bool:
    """True for strings of the form "package.module:Name" or "package.module.Name"."""
    return isinstance(value, str) and (":" in value or value.count(".") >= 1) and " " not in value


def import_object(path: str) -> Any:
    """Resolve "package.module:Name" (or "package.module.Name") to the object it names.

    Raises:
        UserError: if the module or the name cannot be found.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"'{path}' is not an import path: write it as 'package.module:Name'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"cannot import module '{module_name}' named in '{path}' ({exc}): install it or fix "
            "the path"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module '{module_name}' has no '{attr}' (from '{path}'): fix the path")
        obj = getattr(obj, part)
    return obj


def import_path_of(obj: Any) -> str | None:
    """ "module:qualname" of a class or function that can be imported back, else None."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        return None
    path = f"{module}:{qualname}"
    try:
        return path if import_object(path) is obj else None
    except UserError:
        return None
