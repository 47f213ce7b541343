"""Find the scans to process: walk a BIDS tree, or read a user's table of scans.

Two sources, exactly one of which is set:

- ``bids_dir`` (top-level config key): ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]
  [_<key>-<value>...]_<suffix><extension>``. Only ``sub-*`` folders of the root are entered, so
  ``derivatives/``, ``sourcedata/``, ``code/`` and hidden folders are never searched. Symbolic
  links are followed; a link whose target is missing (e.g. git-annex content not fetched) is an
  error once the filters have kept it.
- ``inputs.scans_tsv``: a table with ``participant_id``, ``path`` and optionally ``session_id`` and
  BIDS entity columns (``acq``, ``run``...). Relative paths are resolved against the table's folder.
  Entities (and, without a ``session_id`` column, the session) are also parsed from BIDS-like file
  names; the table's columns win.

Scan id rule: ``sub-<label>`` or ``sub-<label>_ses-<label>``; when a subject/session keeps several
scans (``run_policy: all``), each gets ``_<key>-<value>`` for every entity whose value differs
between those scans, in BIDS entity order (``acq`` before ``rec`` before ``run``...), e.g.
``sub-01_ses-1_run-2``. A scan without the entity gets nothing for it (``sub-01`` next to
``sub-01_run-2``). Ids are unique by construction; they only use letters, digits, ``-`` and
``_``, so they are safe as file names and match :func:`scan_id_wildcard_constraint`.

Why not pybids or snakebids: pybids indexes a dataset into SQLite (minutes for thousands of
subjects, and a heavy dependency chain); snakebids builds on it. The part of BIDS needed here --
two folder levels and one file-name grammar -- is a few regular expressions, and a plain
``os.scandir`` walk indexes thousands of subjects in well under a second.

Example:
    >>> scans = discover_scans({"bids_dir": "/data/bids", "run_policy": "first"})  # doctest: +SKIP
    >>> list(scans.columns[:4])  # doctest: +SKIP
    ['scan_id', 'participant_id', 'session_id', 'path']
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nidl_dino.errors import UserError
from nidl_dino.settings import defaults
from nidl_dino.workflow.participants import (
    normalise_participant_id,
    normalise_session_id,
    read_bids_tsv,
)

logger = logging.getLogger(__name__)

#: Keys of the ``inputs:`` config section and their defaults (the schema's, see
#: :mod:`nidl_dino.settings`). ``bids_dir`` is a top-level key (see INTERFACE.md);
#: :func:`resolve_inputs_config` brings it in.
INPUT_DEFAULTS: dict[str, Any] = defaults("inputs")

#: What to do when a subject/session has several matching scans (e.g. two runs).
RUN_POLICIES: tuple[str, ...] = ("error", "first", "last", "all")

#: BIDS entities a raw anatomical file name may carry (after sub/ses), in the order the BIDS
#: specification puts them; unknown keys are kept too, after these, alphabetically.
ENTITY_ORDER: tuple[str, ...] = (
    "task", "acq", "ce", "trc", "stain", "rec", "dir", "run",
    "mod", "echo", "flip", "inv", "mt", "part", "chunk",
)  # fmt: skip

#: Entity columns always present in the scans table (others only when some scan has them).
CORE_ENTITIES: tuple[str, ...] = ("acq", "ce", "rec", "run")

#: Index entities: compared and sorted as numbers, so ``run-2`` comes before ``run-10``.
_INDEX_ENTITIES = frozenset({"run", "echo", "flip", "inv", "mt", "chunk"})

ID_COLUMNS: tuple[str, ...] = ("scan_id", "participant_id", "session_id", "path")

_LABEL = r"[A-Za-z0-9]+"
_LABEL_RE = re.compile(rf"{_LABEL}")


def _bare_label(value: object, entity: str) -> str | None:
    """``value`` as a BIDS label without its ``<entity>-`` prefix (optional); None if not one."""
    label = str(value).strip()
    label = label[len(entity) + 1 :] if label.startswith(f"{entity}-") else label
    return label if _LABEL_RE.fullmatch(label) else None


def _label_or_fail(value: object, entity: str, key: str, expected: str) -> str:
    """:func:`_bare_label` of a config entry, or a UserError naming ``inputs.<key>``."""
    label = _bare_label(value, entity)
    if label is None:
        raise UserError(f"inputs.{key}: {_q(value)} is {expected}: fix the entry")
    return label


_NAME_RE = re.compile(
    rf"sub-(?P<sub>{_LABEL})(?:_ses-(?P<ses>{_LABEL}))?"
    rf"(?P<entities>(?:_{_LABEL}-{_LABEL})*)_(?P<suffix>{_LABEL})"
)
_ENTITY_RE = re.compile(rf"_({_LABEL})-({_LABEL})")
_CONTROL_CHARS = re.compile(r"[\r\n\t]")


def scan_id_wildcard_constraint() -> str:
    """Return the regular expression every scan id matches, for Snakemake wildcard constraints.

    Returns:
        A pattern without capturing groups, e.g. for
        ``wildcard_constraints: scan_id=scan_id_wildcard_constraint()``.
    """
    return rf"sub-{_LABEL}(?:_ses-{_LABEL})?(?:_{_LABEL}-{_LABEL})*"


# --------------------------------------------------------------------------- config


def _q(value: object) -> str:
    """Quote a path or value for a one-line message (line breaks in names are escaped)."""
    return "'" + _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], str(value)) + "'"


def _preview(items: Iterable[object], limit: int = 3) -> str:
    items = list(items)
    shown = ", ".join(_q(item) for item in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _is_unset(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass(frozen=True)
class _Labels:
    """A set of BIDS labels from the config; YAML integers (``01`` reads as 1) match by number."""

    key: str
    prefix: str
    texts: frozenset[str] = frozenset()
    numbers: frozenset[int] = frozenset()

    def __contains__(self, label: object) -> bool:
        label = str(label)
        return label in self.texts or (label.isdigit() and int(label) in self.numbers)

    def __bool__(self) -> bool:
        return bool(self.texts or self.numbers)

    def unmatched(self, labels: Iterable[str]) -> list[str]:
        """Return the entries that match none of ``labels`` (likely typos), prefixed."""
        labels = set(labels)
        numbers = {int(label) for label in labels if label.isdigit()}
        missing = [t for t in self.texts if t not in labels]
        missing += [str(n) for n in self.numbers if n not in numbers]
        return sorted(f"{self.prefix}-{label}" for label in missing)

    def describe(self) -> str:
        return "[" + ", ".join(sorted(self.texts) + [str(n) for n in sorted(self.numbers)]) + "]"


def _parse_labels(value: Any, key: str, prefix: str) -> _Labels:
    """Turn a config list of labels (or a file of them, one per line) into a :class:`_Labels`.

    Entries may carry the ``<prefix>-`` or not. A string naming an existing file is read as one
    label per line (first column; ``#`` comments, blank lines and a ``participant_id`` or
    ``session_id`` header skipped), so long subject lists can live outside config.yaml.
    """
    if _is_unset(value):
        return _Labels(key, prefix)
    if isinstance(value, str) and os.path.isfile(os.path.expanduser(value)):
        path = os.path.expanduser(value)
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            items: list[Any] = []
            for line in handle:
                first = re.split(r"[\t,;\s]", line.strip(), maxsplit=1)[0]
                if (
                    first
                    and not first.startswith("#")
                    and first not in ("participant_id", "session_id")
                ):
                    items.append(first)
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    else:
        raise UserError(
            f"inputs.{key} must be a list of labels or a file of labels, not {_q(value)}: fix config.yaml"
        )
    texts, numbers = set(), set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            numbers.add(item)
            continue
        expected = (
            f"neither a {prefix} label (letters and digits, '{prefix}-' optional) nor an "
            "existing file of labels"
        )
        texts.add(_label_or_fail(item, prefix, key, expected))
    return _Labels(key, prefix, frozenset(texts), frozenset(numbers))


@dataclass(frozen=True)
class InputsConfig:
    """The ``inputs`` settings after defaults, type checks and normalisation.

    Attributes:
        bids_dir: Absolute BIDS root, or None when ``scans_tsv`` is used.
        scans_tsv: Absolute path of the scans table, or None.
        participants_tsv: Explicit participants table, or None (use ``<bids_dir>/participants.tsv``).
        suffix: BIDS suffix of the scans (``T1w``).
        extensions: File extensions with their dot, longest first.
        sessions: Sessions to keep (empty: all).
        include_subjects: Subjects to keep (empty: all).
        exclude_subjects: Subjects to drop (wins over ``include_subjects``).
        filters: Entity -> accepted values; ``None`` accepts scans without that entity.
        run_policy: One of :data:`RUN_POLICIES`.
    """

    bids_dir: Path | None
    scans_tsv: Path | None
    participants_tsv: Path | None
    suffix: str
    extensions: tuple[str, ...]
    sessions: _Labels
    include_subjects: _Labels
    exclude_subjects: _Labels
    filters: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    run_policy: str = "error"


def _abspath(value: object) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(value))))


def resolve_inputs_config(cfg: Mapping[str, Any]) -> InputsConfig:
    """Check and normalise the inputs configuration.

    Args:
        cfg: Either the whole workflow config (recognised by an ``inputs`` or ``output_dir``
            key; ``bids_dir`` is read from its top level), or the ``inputs`` section itself with
            ``bids_dir`` added. Missing keys take :data:`INPUT_DEFAULTS`.

    Returns:
        The normalised settings.

    Raises:
        UserError: Unknown key, wrong type, both or neither of ``bids_dir`` and ``scans_tsv``.
    """
    if "inputs" in cfg or "output_dir" in cfg:
        if not isinstance(cfg.get("inputs") or {}, Mapping):
            raise UserError(
                "config key inputs must be a mapping of input settings: fix config.yaml"
            )
        section = dict(cfg.get("inputs") or {})
        section["bids_dir"] = cfg.get("bids_dir", section.get("bids_dir"))
    else:
        section = dict(cfg)
    unknown = sorted(set(section) - set(INPUT_DEFAULTS) - {"bids_dir"})
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join('inputs.' + k for k in unknown)}: "
            f"allowed are {', '.join(INPUT_DEFAULTS)}"
        )
    values = {**INPUT_DEFAULTS, **section}

    bids_dir, scans_tsv = values.get("bids_dir"), values["scans_tsv"]
    if _is_unset(bids_dir) and _is_unset(scans_tsv):
        raise UserError(
            "no input set: set bids_dir in config.yaml or --config bids_dir=..., "
            "or inputs.scans_tsv to a table of scans"
        )
    if not _is_unset(bids_dir) and not _is_unset(scans_tsv):
        raise UserError(
            f"both bids_dir {_q(bids_dir)} and inputs.scans_tsv {_q(scans_tsv)} are set: "
            "set bids_dir: null (or --config bids_dir=) to use scans_tsv, or remove inputs.scans_tsv"
        )

    suffix = str(values["suffix"]).strip()
    if not _LABEL_RE.fullmatch(suffix):
        raise UserError(f"inputs.suffix {_q(suffix)} is not a BIDS suffix: use e.g. T1w")
    extensions = values["extensions"]
    if isinstance(extensions, str):
        extensions = [extensions]
    if not isinstance(extensions, (list, tuple)) or not extensions:
        raise UserError(
            f"inputs.extensions {_q(extensions)} must be a non-empty list: use [.nii.gz, .nii]"
        )
    extensions = tuple(
        sorted(
            {e if str(e).startswith(".") else f".{e}" for e in map(str, extensions)},
            key=lambda e: (-len(e), e),
        )
    )

    filters = values["filters"] or {}
    if not isinstance(filters, Mapping):
        raise UserError(
            f"inputs.filters must map entities to values, e.g. {{acq: [mprage]}}, not {_q(filters)}"
        )
    parsed_filters: dict[str, tuple[str | None, ...]] = {}
    for key, accepted in filters.items():
        key = str(key)
        if key in ("sub", "ses") or not _LABEL_RE.fullmatch(key):
            raise UserError(
                f"inputs.filters key {_q(key)} is not a BIDS entity: use include_subjects/sessions "
                "for subjects and sessions, and entity keys such as acq, rec, run"
            )
        accepted = list(accepted) if isinstance(accepted, (list, tuple)) else [accepted]
        parsed_filters[key] = tuple(
            None
            if _is_unset(item)
            else _label_or_fail(item, key, f"filters.{key}", "not a BIDS label")
            for item in accepted
        )

    run_policy = str(values["run_policy"]).strip()
    if run_policy not in RUN_POLICIES:
        raise UserError(
            f"inputs.run_policy {_q(run_policy)} is not one of {', '.join(RUN_POLICIES)}: fix config.yaml"
        )

    return InputsConfig(
        bids_dir=None if _is_unset(bids_dir) else _abspath(bids_dir),
        scans_tsv=None if _is_unset(scans_tsv) else _abspath(scans_tsv),
        participants_tsv=None
        if _is_unset(values["participants_tsv"])
        else _abspath(values["participants_tsv"]),
        suffix=suffix,
        extensions=extensions,
        sessions=_parse_labels(values["sessions"], "sessions", "ses"),
        include_subjects=_parse_labels(values["include_subjects"], "include_subjects", "sub"),
        exclude_subjects=_parse_labels(values["exclude_subjects"], "exclude_subjects", "sub"),
        filters=parsed_filters,
        run_policy=run_policy,
    )


def participants_tsv_path(cfg: Mapping[str, Any] | InputsConfig) -> Path | None:
    """Return the participants table to use: ``inputs.participants_tsv``, else the dataset's.

    Args:
        cfg: As for :func:`resolve_inputs_config`, or its result.

    Returns:
        ``inputs.participants_tsv`` when set; else ``<bids_dir>/participants.tsv`` when that file
        exists; else None (no phenotype columns).

    Raises:
        UserError: ``inputs.participants_tsv`` is set but does not exist.
    """
    settings = cfg if isinstance(cfg, InputsConfig) else resolve_inputs_config(cfg)
    if settings.participants_tsv is not None:
        if not settings.participants_tsv.is_file():
            raise UserError(
                f"inputs.participants_tsv {_q(settings.participants_tsv)} does not exist: fix the path, "
                "or set it to null to use <bids_dir>/participants.tsv"
            )
        return settings.participants_tsv
    if settings.bids_dir is not None and (settings.bids_dir / "participants.tsv").is_file():
        return settings.bids_dir / "participants.tsv"
    return None


# --------------------------------------------------------------------------- discovery


@dataclass
class _Scan:
    participant_id: str
    session_id: str
    path: str
    entities: dict[str, str]
    where: str  # how to point the user at it: the path, or the scans_tsv line
    broken: bool = False


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:  # permissions, a folder removed mid-walk
        logger.warning("cannot list %s (%s); skipped", path, exc.strerror)
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _strip_extension(name: str, extensions: Iterable[str]) -> str | None:
    for extension in extensions:  # longest first, so .nii.gz wins over .gz
        if name.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return None


def _walk_bids(
    root: Path, suffix: str, extensions: tuple[str, ...]
) -> tuple[list[_Scan], list[str], int]:
    """Collect the candidate scans of a BIDS tree.

    Returns:
        The scans, the skipped files (with why), and the number of ``sub-*`` folders seen.
    """
    scans: list[_Scan] = []
    skipped: list[str] = []
    n_subjects = 0
    for subject in _scandir(str(root)):
        if not subject.name.startswith("sub-") or not _is_dir(subject):
            continue
        n_subjects += 1
        sub_label = subject.name[len("sub-") :]
        if not _LABEL_RE.fullmatch(sub_label):
            skipped.append(f"{subject.path} (folder label not letters/digits)")
            continue
        anat_dirs: list[tuple[str, str]] = []
        for child in _scandir(subject.path):
            if child.name == "anat" and _is_dir(child):
                anat_dirs.append((child.path, ""))
            elif child.name.startswith("ses-") and _is_dir(child):
                ses_label = child.name[len("ses-") :]
                anat = os.path.join(child.path, "anat")
                if not _LABEL_RE.fullmatch(ses_label):
                    skipped.append(f"{child.path} (folder label not letters/digits)")
                elif os.path.isdir(anat):
                    anat_dirs.append((anat, ses_label))
        for anat, ses_label in anat_dirs:
            for entry in _scandir(anat):
                broken = not entry.is_file()
                if broken and not entry.is_symlink():
                    continue  # a folder named like a scan
                scan = _parse_scan_name(entry.path, sub_label, ses_label, suffix, extensions)
                if isinstance(scan, str):
                    skipped += [scan] if scan else []
                else:
                    scan.broken = broken
                    scans.append(scan)
    return scans, skipped, n_subjects


def _parse_scan_name(
    path: str, sub_label: str, ses_label: str, suffix: str, extensions: tuple[str, ...]
) -> _Scan | str:
    """The scan a file of a ``sub-<sub_label>/[ses-<ses_label>/]anat/`` folder is.

    Returns:
        The scan; or why the file is skipped (``""``: not a scan of ``suffix`` at all).
    """
    name = os.path.basename(path)
    stem = _strip_extension(name, extensions)
    if stem is None or not stem.endswith(f"_{suffix}") or name.startswith("."):
        return ""
    match = _NAME_RE.fullmatch(stem)
    if match is None:
        return f"{path} (not a BIDS file name)"
    if match["sub"] != sub_label or (match["ses"] or "") != ses_label:
        return f"{path} (sub/ses in the name differ from its folders)"
    return _Scan(
        participant_id=f"sub-{sub_label}",
        session_id=f"ses-{ses_label}" if ses_label else "",
        path=path,
        entities=dict(_ENTITY_RE.findall(match["entities"])),
        where=path,
    )


def _planned_scans(
    root: Path, planned: Iterable[str], suffix: str, extensions: tuple[str, ...]
) -> list[_Scan]:
    """The scans among files a job will write below ``root`` (paths relative to it).

    Each path must be ``sub-*/[ses-*/]anat/<file>``, named as :func:`_walk_bids` expects.
    """
    scans = []
    for rel in planned:
        parts = Path(rel).parts
        if len(parts) not in (3, 4) or parts[-2] != "anat" or not parts[0].startswith("sub-"):
            raise ValueError(f"planned file {rel!r} is not sub-*/[ses-*/]anat/<file>")
        ses_label = parts[1][len("ses-") :] if len(parts) == 4 else ""
        scan = _parse_scan_name(
            str(root / rel), parts[0][len("sub-") :], ses_label, suffix, extensions
        )
        if isinstance(scan, str):
            if scan:
                raise ValueError(f"planned file {rel!r} is not a valid scan name: {scan}")
            continue
        scans.append(scan)
    return scans


def _read_scans_tsv(path: Path, extensions: tuple[str, ...]) -> list[_Scan]:
    """Read the user's scans table into scans (paths resolved and checked)."""
    table = read_bids_tsv(path, what="scans_tsv", infer_numeric=False)
    missing = [c for c in ("participant_id", "path") if c not in table.columns]
    if missing:
        raise UserError(
            f"scans_tsv {_q(path)} lacks column(s) {', '.join(missing)}: it needs participant_id "
            f"and path (session_id and entities such as run optional); found {_preview(table.columns, 8)}"
        )
    has_sessions = "session_id" in table.columns
    entity_columns = [c for c in table.columns if c in ENTITY_ORDER]
    scans, absent = [], []
    for index, row in table.iterrows():
        line = f"{path}:{int(index) + 2}"  # 1-based, after the header
        if pd.isna(row["participant_id"]) or pd.isna(row["path"]):
            raise UserError(
                f"scans_tsv {_q(path)} line {int(index) + 2} has an empty participant_id or path: fill it in"
            )
        participant_id = normalise_participant_id(row["participant_id"])
        session_id = normalise_session_id(row["session_id"]) if has_sessions else ""
        for column, value, prefix in (
            ("participant_id", participant_id, "sub-"),
            ("session_id", session_id, "ses-"),
        ):
            if value and not _LABEL_RE.fullmatch(value[len(prefix) :]):
                raise UserError(
                    f"scans_tsv {_q(path)} line {int(index) + 2}: {column} {_q(value)} is not "
                    f"{prefix}<letters/digits>: fix it (scan ids and file names are built from it)"
                )
        scan_path = Path(os.path.expanduser(str(row["path"])))
        scan_path = Path(
            os.path.abspath(scan_path if scan_path.is_absolute() else path.parent / scan_path)
        )
        stem = _strip_extension(scan_path.name, extensions) or scan_path.name.split(".")[0]
        match = _NAME_RE.fullmatch(stem)
        entities = dict(_ENTITY_RE.findall(match["entities"])) if match else {}
        if match and match["ses"] and not has_sessions:
            session_id = f"ses-{match['ses']}"
        for column in entity_columns:
            value = row[column]
            if not pd.isna(value):
                value = str(value).strip()
                entities[column] = (
                    value[len(column) + 1 :] if value.startswith(f"{column}-") else value
                )
        if not scan_path.is_file():
            absent.append(f"{scan_path} (line {int(index) + 2})")
        scans.append(_Scan(participant_id, session_id, str(scan_path), entities, line))
    if absent:
        raise UserError(
            f"scans_tsv {_q(path)}: {len(absent)} listed file(s) do not exist, e.g. {_preview(absent, 2)}: "
            "fix the paths (relative ones are resolved against the table's folder)"
        )
    return scans


def _entity_keys(scans: Iterable[_Scan]) -> list[str]:
    present = {key for scan in scans for key in scan.entities}
    known = [key for key in ENTITY_ORDER if key in present]
    return known + sorted(present - set(ENTITY_ORDER))


def _label_sort_key(key: str, value: str) -> tuple[int, int, str]:
    if not value:
        return (0, 0, "")
    number = int(value) if key in _INDEX_ENTITIES and value.isdigit() else 0
    return (1, number, value)


def _same_label(key: str, value: str | None, accepted: str | None) -> bool:
    if value is None or accepted is None:
        return value is None and accepted is None
    if key in _INDEX_ENTITIES and value.isdigit() and accepted.isdigit():
        return int(value) == int(accepted)
    return value == accepted


def _filter(scans: list[_Scan], settings: InputsConfig) -> list[_Scan]:
    """Apply the sessions, include/exclude and entity filters (and warn about unmatched entries)."""
    labels = {scan.participant_id[len("sub-") :] for scan in scans}
    sessions = {scan.session_id[len("ses-") :] for scan in scans if scan.session_id}
    for selection, known in (
        (settings.include_subjects, labels),
        (settings.exclude_subjects, labels),
        (settings.sessions, sessions),
    ):
        unmatched = selection.unmatched(known)
        if unmatched:
            logger.warning("inputs.%s: no scan has %s (typo?)", selection.key, ", ".join(unmatched))

    def keep(scan: _Scan) -> bool:
        sub = scan.participant_id[len("sub-") :]
        ses = scan.session_id[len("ses-") :]
        if settings.include_subjects and sub not in settings.include_subjects:
            return False
        if sub in settings.exclude_subjects:
            return False
        if settings.sessions and (not ses or ses not in settings.sessions):
            return False
        return all(
            any(_same_label(key, scan.entities.get(key), a) for a in accepted)
            for key, accepted in settings.filters.items()
        )

    return [scan for scan in scans if keep(scan)]


def _describe_filters(settings: InputsConfig) -> str:
    parts = []
    for selection in (settings.sessions, settings.include_subjects, settings.exclude_subjects):
        if selection:
            parts.append(f"{selection.key}={selection.describe()}")
    if settings.filters:
        parts.append(f"filters={settings.filters}")
    return ", ".join(parts) or "none"


def _apply_run_policy(
    groups: dict[tuple[str, str], list[_Scan]], policy: str
) -> dict[tuple[str, str], list[_Scan]]:
    several = {key: group for key, group in groups.items() if len(group) > 1}
    if not several:
        return groups
    if policy == "error":
        (participant_id, session_id), group = next(iter(several.items()))
        where = "_".join(filter(None, (participant_id, session_id)))
        others = f" ({len(several) - 1} more subject/session(s) too)" if len(several) > 1 else ""
        raise UserError(
            f"duplicate scan id {_q(where)}: {len(group)} scans match, {_preview(s.where for s in group)}"
            f"{others}: set inputs.run_policy to first, last or all, or keep one with inputs.filters "
            "(e.g. {run: [1]} or {acq: [...]})"
        )
    if policy == "all":
        return groups
    dropped = sum(len(group) - 1 for group in several.values())
    logger.info(
        "inputs.run_policy=%s: kept 1 scan per subject/session, dropped %d", policy, dropped
    )
    pick = 0 if policy == "first" else -1
    return {key: [group[pick]] for key, group in groups.items()}


def _scan_ids(group: list[_Scan], keys: list[str]) -> list[str]:
    base = "_".join(filter(None, (group[0].participant_id, group[0].session_id)))
    if len(group) == 1:
        return [base]
    varying = [key for key in keys if len({scan.entities.get(key, "") for scan in group}) > 1]
    return [
        "_".join(
            [base] + [f"{key}-{scan.entities[key]}" for key in varying if scan.entities.get(key)]
        )
        for scan in group
    ]


def discover_scans(cfg: Mapping[str, Any], planned: Iterable[str] | None = None) -> pd.DataFrame:
    """List the scans to process, one row per scan.

    Args:
        cfg: The workflow config (with its ``inputs`` section and top-level ``bids_dir``), or the
            ``inputs`` section with ``bids_dir`` added; see :data:`INPUT_DEFAULTS` for the keys.
        planned: Instead of walking ``bids_dir``, the paths (relative to it) of the files a job
            will write there (the demo cohort's rule); filters and scan ids as for a walk.

    Returns:
        Columns ``scan_id`` (unique; rule in the module docstring), ``participant_id``
        (``sub-<label>``), ``session_id`` (``ses-<label>``, or ``""`` without sessions), ``path``
        (absolute, symlinks not resolved), then entity columns: :data:`CORE_ENTITIES` always,
        other entities when some scan has them; values are the labels as written (``run`` ``"01"``),
        ``""`` when absent. Sorted by participant_id, session_id, then entities (index entities
        such as run numerically), then path.

    Raises:
        UserError: A bad config (see :func:`resolve_inputs_config`); bids_dir missing, not a
            folder or without ``sub-*`` folders; no scan found, or none left after the filters;
            a kept scan that is a broken link; a scans_tsv with missing columns or files; several
            scans for one subject/session under ``run_policy: error``; two files with identical
            subject, session and entities (e.g. the same name as ``.nii`` and ``.nii.gz``).
    """
    settings = resolve_inputs_config(cfg)
    if planned is not None:
        if settings.bids_dir is None:
            raise ValueError("planned files need a bids_dir to lie in")
        scans = _planned_scans(settings.bids_dir, planned, settings.suffix, settings.extensions)
        if not scans:
            raise ValueError("no planned file is a scan")
        source = f"the files planned for bids_dir {_q(settings.bids_dir)}"
    elif settings.bids_dir is not None:
        root = settings.bids_dir
        if not root.exists():
            raise UserError(
                f"bids_dir {_q(root)} does not exist: set bids_dir in config.yaml or --config bids_dir=..."
            )
        if not root.is_dir():
            raise UserError(
                f"bids_dir {_q(root)} is not a directory: set bids_dir to the dataset's root folder"
            )
        scans, skipped, n_subjects = _walk_bids(root, settings.suffix, settings.extensions)
        if skipped:
            logger.warning(
                "skipped %d path(s) that look like %s scans but are not valid BIDS, e.g. %s",
                len(skipped),
                settings.suffix,
                skipped[0],
            )
        pattern = f"sub-*/[ses-*/]anat/sub-*_{settings.suffix}{{{','.join(settings.extensions)}}}"
        if n_subjects == 0:
            raise UserError(
                f"bids_dir {_q(root)} has no sub-* folder: set bids_dir to the BIDS dataset root "
                "(the folder holding participants.tsv and sub-*/)"
            )
        if not scans:
            raise UserError(
                f"no {settings.suffix} scan found in bids_dir {_q(root)} (searched {pattern} in "
                f"{n_subjects} sub-* folders): check inputs.suffix and inputs.extensions"
            )
        source = f"bids_dir {_q(root)} ({pattern})"
    else:
        assert settings.scans_tsv is not None
        scans = _read_scans_tsv(settings.scans_tsv, settings.extensions)
        if not scans:
            raise UserError(f"scans_tsv {_q(settings.scans_tsv)} lists no scan: add rows")
        source = f"scans_tsv {_q(settings.scans_tsv)}"

    keys = _entity_keys(scans)
    scans.sort(
        key=lambda s: (
            s.participant_id,
            s.session_id,
            tuple(_label_sort_key(k, s.entities.get(k, "")) for k in keys),
            s.path,
        )
    )
    found = len(scans)
    scans = _filter(scans, settings)
    if not scans:
        raise UserError(
            f"none of the {found} {settings.suffix} scan(s) in {source} passes the filters "
            f"({_describe_filters(settings)}): check inputs.sessions, inputs.include_subjects, "
            "inputs.exclude_subjects and inputs.filters"
        )
    broken = [scan.path for scan in scans if scan.broken]
    if broken:
        raise UserError(
            f"{len(broken)} scan(s) in {source} are broken symbolic links, e.g. {_preview(broken, 2)}: "
            "fetch their content (e.g. datalad get) or exclude those subjects"
        )

    by_entities: dict[tuple[Any, ...], list[_Scan]] = {}
    for scan in scans:
        signature = (scan.participant_id, scan.session_id, tuple(sorted(scan.entities.items())))
        by_entities.setdefault(signature, []).append(scan)
    clashes = [group for group in by_entities.values() if len(group) > 1]
    if clashes:
        group = clashes[0]
        where = "_".join(filter(None, (group[0].participant_id, group[0].session_id)))
        others = f" ({len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
        raise UserError(
            f"duplicate scan id {_q(where)}: files with the same subject, session and entities: "
            f"{_preview(s.where for s in group)}{others}: remove the extra copies, narrow "
            "inputs.extensions, or tell them apart (session_id/run columns in scans_tsv)"
        )

    groups: dict[tuple[str, str], list[_Scan]] = {}
    for scan in scans:
        groups.setdefault((scan.participant_id, scan.session_id), []).append(scan)
    groups = _apply_run_policy(groups, settings.run_policy)

    kept = [scan for group in groups.values() for scan in group]
    columns = list(CORE_ENTITIES) + [k for k in _entity_keys(kept) if k not in CORE_ENTITIES]
    rows = []
    for group in groups.values():
        for scan, scan_id in zip(group, _scan_ids(group, keys), strict=True):
            rows.append(
                [scan_id, scan.participant_id, scan.session_id, scan.path]
                + [scan.entities.get(key, "") for key in columns]
            )
    table = pd.DataFrame(rows, columns=[*ID_COLUMNS, *columns])
    duplicated = table["scan_id"][table["scan_id"].duplicated()]
    if len(duplicated):  # cannot happen after the checks above; a guard for the file names
        raise UserError(
            f"duplicate scan id(s) {_preview(duplicated)} in {source}: report this as a bug"
        )
    logger.info(
        "found %d scan(s) of %d subject(s) in %s",
        len(table),
        table["participant_id"].nunique(),
        source,
    )
    return table
