"""What the Snakefile needs before any job runs: a checked config, the demo data, the scan list.

Every problem found here is a :class:`~nidl_dino.errors.UserError` with one line naming the config
key or file and the fix; the Snakefile prints that line and exits with status 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nidl_dino.errors import UserError

log = logging.getLogger(__name__)


def fail(message: str) -> None:
    """Print one error line for the user and stop (used by the Snakefile)."""
    print(f"nidl-dino: error: {message}", file=sys.stderr)
    sys.exit(2)


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_at(schema: Mapping[str, Any], path: list) -> Mapping[str, Any]:
    node = schema
    for part in path:
        props = node.get("properties", {})
        if isinstance(part, str) and part in props:
            node = props[part]
        else:
            return {}
    return node


def check_config(config: Mapping[str, Any], schema_path: str | os.PathLike) -> None:
    """Validate ``config`` against the JSON schema, raising one-line errors.

    Unknown keys, wrong types, values out of range and bad choices each name the dotted key.

    Raises:
        UserError: the first problem found (the most relevant, per jsonschema's best_match).
    """
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = set(_schema_at(schema, path).get("properties", {}))
        extra = sorted(set(error.instance) - allowed) if isinstance(error.instance, dict) else []
        name = ".".join([*map(str, path), extra[0]]) if extra else _key(path)
        hint = f" (valid keys here: {', '.join(sorted(allowed))})" if allowed else ""
        raise UserError(
            f"config: unknown key '{name}': remove it or fix its spelling in config.yaml{hint}"
        )
    if error.validator == "required":
        raise UserError(f"config: {error.message} under '{_key(path)}': add it to config.yaml")
    value = error.instance
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    message = " ".join(error.message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    raise UserError(
        f"config key '{_key(path)}' = {shown} is invalid ({message}): fix it in config.yaml or "
        "--config"
    )


def ensure_demo_data(config: Mapping[str, Any]) -> bool:
    """Generate the synthetic demo cohort when the config points at it and it is missing.

    Only when ``demo.enabled`` is true and ``bids_dir`` is ``demo.bids_dir``: a user's own
    ``bids_dir`` that does not exist is an error, never a place to write demo data.

    Returns:
        True if the cohort was generated now.
    """
    demo = config.get("demo") or {}
    bids_dir = config.get("bids_dir")
    if not demo.get("enabled") or not bids_dir:
        return False
    target = Path(demo.get("bids_dir", "demo_data/bids"))
    if Path(bids_dir).resolve() != target.resolve() or (target / "participants.tsv").exists():
        return False
    from nidl_dino.demo import make_demo_dataset

    print(
        f"nidl-dino: generating the synthetic demo cohort in {target} (first run only)",
        file=sys.stderr,
    )
    make_demo_dataset(
        target,
        n_subjects=int(demo.get("n_subjects", 24)),
        seed=int(demo.get("seed", 0)),
        sessions=bool(demo.get("sessions", False)),
        n_bad=int(demo.get("n_bad", 2)),
    )
    return True


def discover(config: Mapping[str, Any]):
    """The scans to process (see :func:`nidl_dino.inputs.discover_scans`), checked for use."""
    from nidl_dino.inputs import discover_scans

    scans = discover_scans(config)
    output_dir = Path(str(config.get("output_dir", "results"))).resolve()
    bids_dir = config.get("bids_dir")
    if bids_dir and Path(bids_dir).resolve() in (output_dir, *output_dir.parents):
        raise UserError(
            f"output_dir '{config.get('output_dir')}' is inside bids_dir '{bids_dir}': "
            "choose an output_dir outside the BIDS dataset"
        )
    # participants.tsv is read now, so its problems (duplicate ids, no participant_id column,
    # unreadable encoding) stop the run before any job, not in its last step.
    from nidl_dino.inputs import participants_tsv_path
    from nidl_dino.participants import missing_participants, read_participants

    participants_file = participants_tsv_path(config)
    if participants_file is not None:
        participants = read_participants(participants_file)
        missing = missing_participants(scans, participants)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            print(
                f"nidl-dino: warning: {len(missing)} scanned subject(s) not in "
                f"{participants_file} ({shown}): their phenotype columns will be empty",
                file=sys.stderr,
            )
    return scans


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML file, with a one-line error naming it when it is not valid YAML."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML: fix the syntax") from None
