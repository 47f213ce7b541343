"""Read the subject- and session-level tables of a BIDS dataset and join them to the scans.

BIDS tables (``participants.tsv``, ``sub-<label>/sub-<label>_sessions.tsv``) are meant to be UTF-8,
tab-separated, with ``n/a`` for missing values. In practice they are often edited in a spreadsheet
and come back comma- or semicolon-separated, in cp1252 or UTF-16, with a byte-order mark or with
leading zeros stripped from the ids. Policy here: whatever can be read without guessing is accepted
with one logged warning saying what was tolerated and how to make the file valid BIDS; whatever
cannot (duplicate ids, no ``participant_id`` column, rows with the wrong number of fields) raises
:class:`~nidl_dino.errors.UserError` with a one-line message.

Example:
    >>> participants = read_participants("/data/bids/participants.tsv")  # doctest: +SKIP
    >>> cohort = merge_participants(scans, participants)  # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from nidl_dino.errors import UserError

logger = logging.getLogger(__name__)

#: Cell values read as missing: BIDS's ``n/a``, an empty cell, and the spellings R and pandas write.
MISSING_VALUES: frozenset[str] = frozenset({"", "n/a", "N/A", "NA", "NaN", "nan"})

_SEPARATOR_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon"}
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+(,\d+)?$")
_CONTROL_CHARS = re.compile(r"[\r\n\t]")


def _one_line(text: str) -> str:
    """Escape line breaks so an error message built from file content stays on one line."""
    return _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


def _quote(path: object) -> str:
    """Quote a path for a one-line message."""
    return f"'{_one_line(str(path))}'"


def _preview(items: Iterable[object], limit: int = 5) -> str:
    """Format the first ``limit`` items as ``'a', 'b' (and 3 more)``."""
    items = list(items)
    shown = ", ".join(f"'{_one_line(str(item))}'" for item in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _decode(data: bytes, path: Path) -> str:
    """Decode a table's bytes: UTF-8 (with or without BOM), UTF-16 with BOM, else cp1252/latin-1."""
    if data.startswith(codecs.BOM_UTF8):
        # Excel's "CSV UTF-8" adds a BOM; harmless once stripped, so no warning.
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="strict")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode text" export: tab-separated UTF-16.
        logger.warning("%s is UTF-16 encoded; read it anyway (BIDS asks for UTF-8)", path)
        return data.decode("utf-16")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # the 5 bytes cp1252 leaves undefined; latin-1 maps every byte
        text, encoding = data.decode("latin-1"), "latin-1"
    logger.warning(
        "%s is not UTF-8; read it as %s (Windows/Latin-1 encoding); re-save it as UTF-8 for BIDS",
        path,
        encoding,
    )
    return text


def _detect_separator(header: str, path: Path) -> str:
    """Pick the column separator from the header line; warn when it is not BIDS's tab."""
    if "\t" in header:
        return "\t"
    counts = {sep: header.count(sep) for sep in (",", ";")}
    sep = max(counts, key=counts.__getitem__)
    if counts[sep] == 0:
        return "\t"  # a single column; nothing to detect
    logger.warning(
        "%s is %s-separated; read it anyway (BIDS tables are tab-separated)",
        path,
        _SEPARATOR_NAMES[sep],
    )
    return sep


def read_bids_tsv(
    path: str | Path,
    *,
    what: str = "table",
    infer_numeric: bool = True,
    text_columns: Iterable[str] = ("participant_id", "session_id"),
) -> pd.DataFrame:
    """Read a BIDS tabular file tolerantly.

    Encoding: UTF-8 (a BOM is ignored); UTF-16 with a BOM and cp1252/latin-1 are read with a
    warning. Separator: tab; a header without tabs but with commas or semicolons is read with that
    separator and a warning (quoted fields allowed, as spreadsheets write them; semicolon files may
    use decimal commas). Cells are stripped of surrounding spaces, :data:`MISSING_VALUES` become
    missing, empty trailing columns are dropped, and (when ``infer_numeric``) columns whose values
    all parse as numbers become numeric.

    Args:
        path: The file to read.
        what: Name of the file's role used in error messages (e.g. ``participants.tsv``).
        infer_numeric: Convert all-numeric columns to numbers; otherwise every column is text.
        text_columns: Columns never converted to numbers (ids: ``01`` must not become ``1``).

    Returns:
        One row per data line, columns named as in the header; missing cells are NA.

    Raises:
        UserError: The file is missing, empty, has duplicate column names or rows with the wrong
            number of fields.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {_quote(path)} does not exist: fix the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {_quote(path)} is a directory, not a file: fix the path") from None
    except OSError as exc:
        raise UserError(
            f"{what} {_quote(path)} cannot be read ({exc.strerror}): fix its permissions"
        ) from None
    text = _decode(data, path)
    header = next((line for line in text.splitlines() if line.strip()), "")
    if not header:
        raise UserError(
            f"{what} {_quote(path)} is empty: add a header line such as 'participant_id'"
        )
    sep = _detect_separator(header, path)
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    # csv rather than pandas.read_csv: pandas silently turns extra leading fields into an index.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    columns: list[str] | None = None
    rows: list[list[str]] = []
    for row in reader:
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue  # blank line
        if columns is None:
            columns = cells
            continue
        extra = cells[len(columns) :]
        if any(extra):
            raise UserError(
                f"{what} {_quote(path)} line {reader.line_num} has {len(cells)} fields but the header "
                f"has {len(columns)}: separate columns with exactly one "
                f"{_SEPARATOR_NAMES[sep]} and write n/a for missing values"
            )
        # Short rows (editors drop trailing empty cells) are padded as missing.
        rows.append(cells[: len(columns)] + [""] * (len(columns) - len(cells)))
    assert columns is not None  # a non-blank header exists
    duplicated = sorted({name for name in columns if name and columns.count(name) > 1})
    if duplicated:
        raise UserError(
            f"{what} {_quote(path)} has duplicate column(s) {_preview(duplicated)}: rename them"
        )
    # Spreadsheets often leave trailing separators: unnamed, empty columns carry nothing.
    keep = [i for i, name in enumerate(columns) if name or any(row[i] for row in rows)]
    if any(not columns[i] for i in keep):
        raise UserError(
            f"{what} {_quote(path)} has values in a column without a name: add its name to the header"
        )
    frame = pd.DataFrame(
        [[row[i] for i in keep] for row in rows], columns=[columns[i] for i in keep], dtype=str
    )
    frame = frame.mask(frame.isin(MISSING_VALUES))
    if infer_numeric:
        for name in frame.columns.difference(list(text_columns), sort=False):
            frame[name] = _to_numeric_if_possible(frame[name], decimal_comma=sep == ";")
    return frame


def _to_numeric_if_possible(column: pd.Series, *, decimal_comma: bool) -> pd.Series:
    """Return ``column`` as numbers when every non-missing value parses as one, else unchanged."""
    values = column.dropna()
    if values.empty:
        return column
    if decimal_comma and values.str.fullmatch(_DECIMAL_COMMA).all():
        column = column.str.replace(",", ".", regex=False)
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def normalise_participant_id(value: object) -> str:
    """Return a participant id in BIDS form: ``'01'`` and ``'sub-01'`` both give ``'sub-01'``."""
    text = str(value).strip()
    return text if text.startswith("sub-") else f"sub-{text}"


def normalise_session_id(value: object) -> str:
    """Return a session id in BIDS form (``'ses-<label>'``); missing or empty gives ``''``."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    text = str(value).strip()
    if text in MISSING_VALUES:
        return ""
    return text if text.startswith("ses-") else f"ses-{text}"


def _normalise_ids(frame: pd.DataFrame, column: str, path: Path, what: str) -> pd.DataFrame:
    """Check that ``column`` exists and has no empty cell, and put its values in BIDS form."""
    if column not in frame.columns:
        hint = " (is the file tab-separated?)" if len(frame.columns) == 1 else ""
        raise UserError(
            f"{what} {_quote(path)} has no '{column}' column{hint}: "
            f"add one (columns found: {_preview(frame.columns)})"
        )
    empty = frame.index[frame[column].isna()]
    if len(empty):
        rows = _preview(int(i) + 2 for i in empty)  # +2: 1-based, after the header line
        raise UserError(
            f"{what} {_quote(path)} has an empty {column} on line(s) {rows}: fill them in"
        )
    normalise = normalise_participant_id if column == "participant_id" else normalise_session_id
    frame = frame.copy()
    frame[column] = frame[column].astype(str).map(normalise)
    return frame


def _read_id_table(path: Path, what: str, column: str, unit: str) -> pd.DataFrame:
    """A BIDS TSV keyed by ``column`` (ids normalised), refused when an id is listed twice."""
    frame = _normalise_ids(read_bids_tsv(path, what=what), column, path, what)
    duplicated = frame[column][frame[column].duplicated()].unique()
    if len(duplicated):
        raise UserError(
            f"{what} {_quote(path)} lists {column} {_preview(sorted(duplicated))} more than once: "
            f"keep one row per {unit}"
        )
    return frame


def read_participants(path: str | Path, required_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a BIDS ``participants.tsv``.

    Reading is tolerant (see :func:`read_bids_tsv`: comma/semicolon separators and non-UTF-8
    encodings are accepted with a logged warning); ``participant_id`` values are put in
    ``sub-<label>`` form, so ``01`` and ``sub-01`` are the same subject.

    Args:
        path: The participants file.
        required_ids: Participant ids (with or without ``sub-``) that must be in the file, e.g. the
            subjects of a probe that needs their phenotype. None checks nothing.

    Returns:
        One row per participant; ``participant_id`` first, then the file's columns in order
        (all-numeric columns as numbers, missing values as NA).

    Raises:
        UserError: Missing file, no ``participant_id`` column, an empty or duplicate
            ``participant_id`` (e.g. ``01`` and ``sub-01``), or a required id absent.
    """
    path = Path(path)
    what = "participants file"
    frame = _read_id_table(path, what, "participant_id", "participant")
    if required_ids is not None:
        missing = sorted(
            set(map(normalise_participant_id, required_ids)) - set(frame["participant_id"])
        )
        if missing:
            raise UserError(
                f"{what} {_quote(path)} has no row for participant_id {_preview(missing)}: add them"
            )
    return frame[["participant_id", *[c for c in frame.columns if c != "participant_id"]]]


def read_sessions(bids_dir: str | Path, participant_ids: Iterable[str]) -> pd.DataFrame:
    """Read the ``sub-<label>/sub-<label>_sessions.tsv`` files of the given participants.

    Subjects without a sessions file are skipped. Ids are normalised as in
    :func:`read_participants`.

    Args:
        bids_dir: Root of the BIDS dataset.
        participant_ids: Participants to look up (with or without ``sub-``).

    Returns:
        One row per session: ``participant_id``, ``session_id``, then the union of the files'
        columns (missing cells NA). Empty (those two columns only) when no file exists.

    Raises:
        UserError: A sessions file without ``session_id``, with an empty or duplicate one.
    """
    frames = []
    for participant_id in sorted(set(map(normalise_participant_id, participant_ids))):
        path = Path(bids_dir) / participant_id / f"{participant_id}_sessions.tsv"
        if not path.is_file():
            continue
        frame = _read_id_table(path, "sessions file", "session_id", "session")
        frame = frame.drop(columns=["participant_id"], errors="ignore")
        frame.insert(0, "participant_id", participant_id)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(
            {"participant_id": pd.Series(dtype=str), "session_id": pd.Series(dtype=str)}
        )
    # Re-infer numbers: a column numeric in one file and text in another stays text.
    merged = pd.concat(frames, ignore_index=True)
    for name in merged.columns[2:]:
        if not pd.api.types.is_numeric_dtype(merged[name]):
            merged[name] = _to_numeric_if_possible(merged[name], decimal_comma=False)
    return merged


def _match_by_number(scan_ids: Iterable[str], table_ids: Iterable[str]) -> dict[str, str]:
    """Map scan subjects missing from a table to table ids equal as numbers (``sub-01`` ~ ``sub-1``).

    Spreadsheets turn ``01`` into ``1``; a subject is matched only when exactly one table id has
    the same number and that id is not itself a scanned subject.
    """
    scan_ids, table_ids = set(scan_ids), set(table_ids)
    by_number: dict[int, list[str]] = {}
    for table_id in table_ids - scan_ids:
        label = table_id[len("sub-") :]
        if label.isdigit():
            by_number.setdefault(int(label), []).append(table_id)
    matches = {}
    for scan_id in scan_ids - table_ids:
        label = scan_id[len("sub-") :]
        candidates = by_number.get(int(label), []) if label.isdigit() else []
        if len(candidates) == 1:
            matches[scan_id] = candidates[0]
    return matches


def missing_participants(scans: pd.DataFrame, participants: pd.DataFrame) -> list[str]:
    """Return the sorted participant ids of ``scans`` that have no row in ``participants``."""
    return sorted(set(scans["participant_id"]) - set(participants["participant_id"]))


def _rename_clashes(
    table: pd.DataFrame, taken: Iterable[str], prefix: str, keys: list[str]
) -> pd.DataFrame:
    """Prefix the columns of ``table`` (other than ``keys``) that already exist in ``taken``."""
    taken = set(taken)
    clashes = {c: f"{prefix}_{c}" for c in table.columns if c in taken and c not in keys}
    if clashes:
        logger.warning("renamed %s column(s) that clash with scan columns: %s", prefix, clashes)
    return table.rename(columns=clashes)


def merge_participants(
    scans: pd.DataFrame,
    participants: pd.DataFrame,
    sessions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Join participant (and optionally session) columns to every scan.

    A left join on ``participant_id`` (then on ``participant_id`` and ``session_id`` for
    ``sessions``): every scan is kept, in order. Scans whose subject has no row in
    ``participants`` keep empty (NA) participant columns, and are reported by one logged warning
    (:func:`missing_participants` returns them as a list). A subject that only matches after
    dropping leading zeros (``sub-01`` scanned, ``1`` in the table, as spreadsheets write it) is
    matched, with a warning. A column present in both tables (e.g. ``age``) takes the session
    value where it is present, else the participant value. Participant or session columns named
    like a scan column (e.g. ``path``) are renamed ``participants_<name>``/``sessions_<name>``.

    Args:
        scans: Output of :func:`nidl_dino.workflow.inputs.discover_scans` (at least ``participant_id``
            and, with ``sessions``, ``session_id``).
        participants: Output of :func:`read_participants`.
        sessions: Output of :func:`read_sessions`, or None.

    Returns:
        ``scans``' columns followed by the participant columns, then the session-only columns;
        one row per scan, same order and index as ``scans``.
    """
    participants = participants.copy()
    matches = _match_by_number(scans["participant_id"], participants["participant_id"])
    if matches:
        logger.warning(
            "matched %d scanned subject(s) to participants ids written without leading zeros "
            "(e.g. %s -> %s); write ids as in the folder names",
            len(matches),
            *next(iter(sorted(matches.items()))),
        )
        participants["participant_id"] = participants["participant_id"].replace(
            {v: k for k, v in matches.items()}
        )
    missing = missing_participants(scans, participants)
    if missing:
        logger.warning(
            "%d scanned subject(s) have no row in participants.tsv; their participant columns "
            "are left empty: %s",
            len(missing),
            _preview(missing),
        )
    participants = _rename_clashes(participants, scans.columns, "participants", ["participant_id"])
    merged = scans.merge(participants, on="participant_id", how="left", sort=False)
    if sessions is not None and len(sessions.columns) > 2:
        keys = ["participant_id", "session_id"]
        sessions = _rename_clashes(sessions, scans.columns, "sessions", keys)
        shared = [c for c in sessions.columns if c in merged.columns and c not in keys]
        merged = merged.merge(sessions, on=keys, how="left", sort=False, suffixes=("", "__session"))
        for name in shared:
            merged[name] = merged.pop(f"{name}__session").combine_first(merged[name])
    merged.index = scans.index
    return merged
