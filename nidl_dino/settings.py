"""The configuration's defaults, read from the one schema that states them.

``nidl_dino/config.schema.yaml`` is the single place where a config key's default is written.
The Snakefile validates ``config.yaml`` against it (Snakemake fills the defaults); the package
reads the same file here, so a function called without the workflow (a notebook, a benchmark,
a test) gets exactly the defaults a run gets. Nothing else in the package states a default for
a config key.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SCHEMA_PATH", "defaults", "load_schema", "with_defaults"]

#: The JSON schema (YAML) of config.yaml: types, bounds and defaults of every key.
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@functools.cache
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_schema() -> dict[str, Any]:
    """A copy of the schema (the cached original stays untouched)."""
    return copy.deepcopy(_schema())


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = _schema()
        for part in ref[2:].split("/"):
            target = target[part]
        return target
    return node


def _node(path: tuple[str, ...]) -> Mapping[str, Any]:
    node: Mapping[str, Any] = _schema()
    for part in path:
        props = _resolve(node).get("properties", {})
        if part not in props:
            raise KeyError(f"config key {'.'.join(path)!r} is not in {SCHEMA_PATH.name}")
        node = props[part]
    return _resolve(node)


def _defaults_of(node: Mapping[str, Any], top: bool = False) -> Any:
    """The default a node gives, as Snakemake's validator fills it.

    A key gets a value only when its schema node has a ``default`` (a ``$ref``'s sibling
    default counts); an object's default is then completed with its properties' defaults.
    ``top``: the node asked for itself, completed even without a default of its own.
    """
    has_default = "default" in node
    value = copy.deepcopy(node.get("default"))
    node = _resolve(node)
    if not has_default and "default" in node:
        has_default, value = True, copy.deepcopy(node["default"])
    if not (has_default or top):
        return _MISSING
    props = node.get("properties")
    if props and (value is None or isinstance(value, dict)):
        value = dict(value or {})
        for key, sub in props.items():
            sub_default = _defaults_of(sub)
            if sub_default is not _MISSING:
                value[key] = _merge(sub_default, value[key]) if key in value else sub_default
    return value if (has_default or value) else _MISSING


_MISSING: Any = object()


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, Mapping):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def defaults(*path: str) -> Any:
    """The defaults of a config section (or key), e.g. ``defaults("preprocessing")``.

    Nested sections are filled down to their leaves; a key without a default is absent.

    Raises:
        KeyError: ``path`` is not a key of the schema.
    """
    value = _defaults_of(_node(tuple(path)), top=True)
    return {} if value is _MISSING else value


def with_defaults(section: Mapping[str, Any] | None, *path: str) -> dict[str, Any]:
    """``section`` (partial, nested) merged over the schema's defaults for ``path``."""
    return _merge(defaults(*path), dict(section or {}))
