"""The schema is the one place config defaults are stated (nidl_dino.settings).

Checked three ways: the package's reading of the defaults equals what Snakemake's own validator
fills into an empty config (an independent implementation of JSON-schema defaults); the shipped
config.yaml agrees with them; and no module of the package states a literal default for a
config key of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nidl_dino.settings import SCHEMA_PATH, defaults, load_schema, with_defaults

ROOT = Path(__file__).resolve().parents[1]

#: config.yaml keys deliberately set to something else than the package default, and why.
CONFIG_YAML_CHOICES = {
    # the schema allows a name or {name, kwargs}; config.yaml shows the long form to edit
    "encoder": "the same encoder, in the long form with kwargs",
}

#: JSON-schema words that are not config keys (read from the schema itself by workflow.py).
SCHEMA_WORDS = {"type", "properties", "default", "items", "oneOf", "enum", "$ref"}


def _leaves(value, prefix=""):
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _leaves(sub, f"{prefix}{key}.")
    else:
        yield prefix[:-1], value


def test_package_defaults_equal_snakemakes_filled_defaults():
    from snakemake.utils import validate

    sections = [
        key
        for key, node in load_schema()["properties"].items()
        if isinstance(node.get("default"), dict)
    ]
    assert {"preprocessing", "views", "inputs", "demo", "model"} <= set(sections)
    config = {"output_dir": "out"}
    validate(config, str(SCHEMA_PATH))
    for section in sections:
        assert defaults(section) == config[section], section
    assert defaults("seed") == config["seed"] == 0


def test_shipped_config_yaml_states_the_schema_defaults():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    expected = defaults()
    differing = []
    for key, value in _leaves(shipped):
        node = expected
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = KeyError
                break
            node = node[part]
        top = key.split(".")[0]
        if node is not KeyError and node != value and top not in CONFIG_YAML_CHOICES:
            differing.append(f"{key}: config.yaml {value!r}, schema {node!r}")
    assert not differing, "\n".join(differing)


def test_no_literal_default_for_a_config_key_in_the_package():
    keys = {k.split(".")[-1] for k, _ in _leaves(defaults())} - SCHEMA_WORDS
    literal = r"""(["'\d\[{-]|True\b|False\b|None\b)"""
    pattern = re.compile(r"""\.get\(\s*["']([a-z_]+)["']\s*,\s*""" + literal)
    found = []
    for path in sorted((ROOT / "nidl_dino").rglob("*.py")):
        if path.name == "settings.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                if match.group(1) in keys:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "defaults belong in nidl_dino/config.schema.yaml:\n" + "\n".join(found)


def test_constants_are_the_schema_defaults():
    from nidl_dino.preprocessing import DEFAULT_CONFIG
    from nidl_dino.views.crops import DEFAULT_VIEWS_CONFIG
    from nidl_dino.workflow.inputs import INPUT_DEFAULTS

    assert DEFAULT_CONFIG == defaults("preprocessing")
    assert DEFAULT_VIEWS_CONFIG == defaults("views")
    assert INPUT_DEFAULTS == defaults("inputs")


def test_with_defaults_merges_nested_and_copies():
    merged = with_defaults({"pca": {"n_components": 5}}, "probes")
    assert merged["pca"] == {
        "n_components": 5,
        "downsample": defaults("probes", "pca", "downsample"),
    }
    assert merged["n_splits"] == defaults("probes", "n_splits")
    merged["targets"].append("x")
    assert "x" not in defaults("probes")["targets"]  # a copy, never the schema's own list
    # a value of another shape than the default replaces it (encoder: name or mapping)
    assert with_defaults({"encoder": {"name": "resnet18"}})["encoder"] == {"name": "resnet18"}


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="probes.nope"):
        defaults("probes", "nope")
