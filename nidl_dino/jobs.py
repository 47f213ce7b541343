"""Running one workflow job: logging to the job's log file, one-line errors for the user."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator

from nidl_dino.errors import UserError


@contextlib.contextmanager
def job(log_path: str | None, name: str) -> Iterator[logging.Logger]:
    """Log to ``log_path`` (and stderr); a UserError becomes one line and exit status 2.

    Any other exception is a bug: its traceback goes to the log file, and the job fails with a
    one-line pointer to that file.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logger = logging.getLogger(f"nidl_dino.{name}")
    try:
        yield logger
    except UserError as err:
        logger.error("%s", err)
        print(f"nidl-dino: error in {name}: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        logger.error("unexpected failure:\n%s", traceback.format_exc())
        print(
            f"nidl-dino: {name} failed unexpectedly; the traceback is in {log_path}",
            file=sys.stderr,
        )
        raise


def preprocess_or_exclude(
    in_file: str,
    out_dir: str,
    prefix: str,
    config: dict | None = None,
    ids: dict | None = None,
) -> dict:
    """Preprocess one scan; whatever goes wrong, leave a QC record instead of a failed job.

    :func:`nidl_dino.preprocessing.preprocess_scan` already turns every kind of bad input into
    an ``excluded`` record. This guard covers the rest (a library crash on a strange file): the
    scan is excluded with the error as its reason, the traceback goes to the job's log, and the
    other subjects carry on.
    """
    import json
    import os
    from pathlib import Path

    from nidl_dino.preprocessing import preprocess_scan

    ids = {**(ids or {}), "scan_id": prefix}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        return preprocess_scan(in_file, out_dir, prefix, config=config, ids=ids)
    except Exception as exc:  # noqa: BLE001 - the point is to contain any failure
        logging.getLogger("nidl_dino.preprocess").error(
            "preprocessing %s crashed:\n%s", in_file, traceback.format_exc()
        )
        reason = f"preprocessing failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        record = {
            **ids,
            "input_file": str(in_file),
            "status": "excluded",
            "reason": reason[:300],
        }
        path = Path(out_dir) / f"{prefix}_qc.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return record
