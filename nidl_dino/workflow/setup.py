"""What the Snakefile needs before any job runs: a checked config, the demo data, the scan list.

Every problem found here is a :class:`~nidl_dino.errors.UserError` with one line naming the config
key or file and the fix; the Snakefile prints that line and exits with status 2, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nidl_dino.atomic import write_text_atomic
from nidl_dino.errors import UserError
from nidl_dino.settings import with_defaults
from nidl_dino.workflow.layout import Layout

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


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {})
        return node
    return schema


def coerce_to_schema(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """Turn strings into the types the schema asks for, where they parse as such.

    Snakemake reads nested ``--config`` values (``trainer={'max_epochs': 5}``) with YAML's
    BaseLoader, so every scalar in them is a string. Where the schema does not allow a string at
    that place, the string is parsed as YAML (``"5"`` -> 5, ``"true"`` -> True, ``"null"`` ->
    None); anything else is left for the validation to report.
    """
    schema = _resolve(schema, root)
    if isinstance(value, (dict, list)) and "oneOf" in schema:
        wanted = "object" if isinstance(value, dict) else "array"
        for branch in schema["oneOf"]:
            branch = _resolve(branch, root)
            types = branch.get("type", [])
            if wanted == types or (isinstance(types, list) and wanted in types):
                return coerce_to_schema(value, branch, root)
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = coerce_to_schema(item, sub, root)
            elif extra is not False:  # free-form (encoder kwargs, extra Trainer options)
                value[key] = _parse_scalars(item)
        return value
    if isinstance(value, list):
        items = schema.get("items")
        return (
            [coerce_to_schema(v, items, root) for v in value] if isinstance(items, dict) else value
        )
    if isinstance(value, str):
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        if "string" in types or not (types or "oneOf" in schema or "enum" in schema):
            return value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (dict, list)) and "oneOf" in schema:
            return parsed
        return parsed if not isinstance(parsed, str) else value
    return value


def _parse_scalars(value: Any) -> Any:
    """Strings YAML reads as numbers, booleans or null become those; the rest is unchanged."""
    if isinstance(value, dict):
        return {k: _parse_scalars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_scalars(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if parsed is None or isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def check_config(config: Mapping[str, Any], schema_path: str | os.PathLike) -> None:
    """Validate ``config`` against the JSON schema, raising one-line errors.

    Strings from nested ``--config`` values are first converted to the schema's types (in
    place, see :func:`coerce_to_schema`).

    Unknown keys, wrong types, values out of range and bad choices each name the dotted key.

    Raises:
        UserError: the first problem found (the most relevant, per jsonschema's best_match).
    """
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    coerce_to_schema(config, schema, schema)  # in place: nested --config values are strings
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
    rule = error.schema.get("description") if error.schema is not schema else None
    if isinstance(rule, str):  # a rule across keys says why itself
        raise UserError(f"config key '{_key(path)}' = {shown}: {' '.join(rule.split())}")
    message = " ".join(error.message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    raise UserError(
        f"config key '{_key(path)}' = {shown} is invalid ({message}): fix it in config.yaml or "
        "--config"
    )


@dataclass(frozen=True)
class DemoPlan:
    """The synthetic demo cohort a run will generate (a job of the workflow, not parse time).

    Attributes:
        bids_dir: Where it goes (``demo.bids_dir``), absolute.
        scans: Its scans' paths relative to ``bids_dir``, as discovery will find them.
        outputs: Every file the job declares (scans, ``dataset_description.json``,
            ``participants.tsv``), absolute.
        arguments: Keyword arguments of :func:`nidl_dino.demo.make_demo_dataset`.
    """

    bids_dir: str
    scans: tuple[str, ...]
    outputs: tuple[str, ...]
    arguments: dict[str, Any]

    @property
    def description(self) -> str:
        """Its ``dataset_description.json`` (the derivatives' ``SourceDatasets`` reads it)."""
        return str(Path(self.bids_dir) / "dataset_description.json")


def demo_plan(config: Mapping[str, Any]) -> DemoPlan | None:
    """The demo cohort to generate, when the config points at it and it is missing.

    Only when ``demo.enabled`` is true and ``bids_dir`` is ``demo.bids_dir``: a user's own
    ``bids_dir`` that does not exist is an error, never a place to write demo data. Nothing is
    written here: the Snakefile plans the jobs on the planned scans and the ``demo_data`` rule
    writes them, so ``snakemake -n`` leaves the disk as it was.

    Returns:
        The plan, or None (no demo, or the demo is already there).

    Raises:
        UserError: ``demo.bids_dir`` holds a demo cohort of another ``demo.variant``.
    """
    demo = with_defaults(config.get("demo"), "demo")
    bids_dir = config.get("bids_dir")
    if not demo["enabled"] or not bids_dir:
        return None
    target = Path(demo["bids_dir"]).absolute()
    if Path(bids_dir).resolve() != target.resolve():
        return None
    from nidl_dino.demo import planned_files, recorded_variant

    variant = str(demo["variant"])
    if (target / "participants.tsv").exists():
        found = recorded_variant(target)
        if found is not None and found != variant:
            raise UserError(
                f"{target}: holds the demo variant {found!r} but demo.variant is {variant!r}; "
                "delete that folder (or set demo.bids_dir to a new one) to generate it"
            )
        return None
    arguments = {
        "n_subjects": int(demo["n_subjects"]),
        "seed": int(demo["seed"]),
        "sessions": bool(demo["sessions"]),
        "n_bad": int(demo["n_bad"]),
        "variant": variant,
    }
    files = planned_files(
        arguments["n_subjects"], arguments["seed"], arguments["sessions"], variant=variant
    )
    root = Path(bids_dir).absolute()
    return DemoPlan(
        bids_dir=str(root),
        scans=tuple(files["scans"]),
        outputs=tuple(str(root / rel) for rel in files["tables"] + files["scans"]),
        arguments=arguments,
    )


def source_description(config: Mapping[str, Any], demo: DemoPlan | None) -> list[str]:
    """The input dataset's ``dataset_description.json`` (read for the derivatives'
    ``SourceDatasets``): the demo's when a job writes it, else the file if present.

    The same absolute path either way, so the run after the demo was generated sees the same
    input and does not redo the job.
    """
    if demo is not None:
        return [demo.description]
    bids_dir = config.get("bids_dir")
    path = Path(str(bids_dir)).absolute() / "dataset_description.json" if bids_dir else None
    return [str(path)] if path is not None and path.is_file() else []


def scan_cache_path(config: Mapping[str, Any]) -> Path:
    """Where the scan list of this configuration is cached, below ``output_dir``.

    The name is a hash of everything discovery depends on (``bids_dir`` and the ``inputs``
    section), so another selection of scans never reads this one's list.
    """
    key = json.dumps(
        {"bids_dir": str(config.get("bids_dir")), "inputs": config.get("inputs")},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Layout(Path(str(config["output_dir"]))).scan_cache(digest)


def discover(config: Mapping[str, Any], reuse_cache: bool = False, demo: DemoPlan | None = None):
    """The scans to process (see :func:`nidl_dino.workflow.inputs.discover_scans`), checked for use.

    The main Snakemake process walks the BIDS tree (new subjects are found), and caches the list
    when the run starts (:func:`write_scan_cache`, from the Snakefile's ``onstart``: a dry run
    writes nothing); with ``reuse_cache`` (a cluster job, which re-reads the Snakefile for its one
    job) the cached list is read instead, so N jobs do not walk the tree N times. With a ``demo``
    to generate, its planned scans are listed instead of the (not yet written) tree.
    """
    import pandas as pd

    from nidl_dino.workflow.inputs import discover_scans

    cache = scan_cache_path(config)
    if reuse_cache and cache.is_file():
        return pd.read_csv(cache, sep="\t", dtype=str, keep_default_na=False)
    scans = discover_scans(config, planned=demo.scans if demo is not None else None)
    output_dir = Path(str(config["output_dir"])).resolve()
    bids_dir = config.get("bids_dir")
    if bids_dir and Path(bids_dir).resolve() in (output_dir, *output_dir.parents):
        raise UserError(
            f"output_dir '{config.get('output_dir')}' is inside bids_dir '{bids_dir}': "
            "choose an output_dir outside the BIDS dataset"
        )
    # participants.tsv is read now, so its problems (duplicate ids, no participant_id column,
    # unreadable encoding) stop the run before any job, not in its last step.
    from nidl_dino.workflow.inputs import participants_tsv_path
    from nidl_dino.workflow.participants import missing_participants, read_participants

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


#: Memory (MB) and runtime (minutes) of the rules that gather the whole cohort, as
#: ``base + per_scan * N``. Measured on 10,000 synthetic scans (benchmarks/scale.py, 2-core
#: Xeon VM): cohort 207 MiB peak and 40 s, report 506 MiB and about 2 min; the probes hold the
#: baseline tables (128^3 volumes block-averaged by 4: 128 kB per scan) and fit ridge and logistic
#: probes per fold. Each gets about twice what was measured.
AGGREGATE_RESOURCES: dict[str, dict[str, tuple[float, float]]] = {
    "qc_table": {"mem_mb": (1000, 0.05), "runtime": (10, 0.002)},
    "cohort": {"mem_mb": (1000, 0.05), "runtime": (10, 0.002)},
    "probe": {"mem_mb": (4000, 0.6), "runtime": (30, 0.01)},
    "report": {"mem_mb": (2000, 0.1), "runtime": (15, 0.004)},
    "model_card": {"mem_mb": (2000, 0.0), "runtime": (10, 0.0)},
}


def aggregate_resources(rule: str, n_scans: int) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` of a cohort-wide rule for ``n_scans`` scans (see
    :data:`AGGREGATE_RESOURCES`), so a 10,000-scan cohort asks for what it needs."""
    return {
        key: int(round(base + per_scan * max(0, int(n_scans))))
        for key, (base, per_scan) in AGGREGATE_RESOURCES[rule].items()
    }


def preprocess_batches(scan_ids: list[str], scans_per_job: int) -> dict[str, list[str]]:
    """Consecutive groups of at most ``scans_per_job`` scans: ``batch-0001`` -> scan ids.

    Preprocessing runs one job per batch (:func:`nidl_dino.workflow.jobs.preprocess_batch`), which skips
    the scans it finished before, so regrouping after new subjects costs no recomputation.
    """
    size = max(1, int(scans_per_job))
    n = max(1, -(-len(scan_ids) // size))
    width = max(4, len(str(n)))
    return {
        f"batch-{k + 1:0{width}d}": list(scan_ids[k * size : (k + 1) * size])
        for k in range(n)
        if scan_ids[k * size : (k + 1) * size]
    }


def preprocess_rule_name(batch: str) -> str:
    """The rule of a preprocessing batch: ``batch-0001`` -> ``preprocess_batch_0001``."""
    return "preprocess_" + batch.replace("-", "_")


def loader_threads(num_workers: int | str, threads: int | None) -> int:
    """A rule's threads from its loader workers and ``resources.<rule>.threads``.

    ``auto`` workers are the job's threads (:func:`nidl_dino.training.data.resolve_num_workers`), so the
    threads alone; a count of workers asks for at least that many threads.
    """
    workers = 0 if num_workers == "auto" else int(num_workers)
    return max(1, workers, int(threads or 1))


def write_scan_cache(config: Mapping[str, Any], scans) -> None:
    """Cache the scan list for the cluster jobs of this run (rewritten only when it changed)."""
    path = scan_cache_path(config)
    text = scans.to_csv(sep="\t", index=False)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)
