"""Running workflow jobs: logging to the job's log file, one-line errors for the user, and
preprocessing a batch of scans in one job with each scan isolated in its own process."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nidl_dino.atomic import write_text_atomic
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
        write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        return record


#: Name of the file, in a scan's preprocessing folder, that says which input and configuration
#: the folder was made from; a batch job skips a scan whose signature matches.
SIGNATURE_FILE = ".nidl-dino-done.json"


def input_signature(path: str | os.PathLike, config: dict | None) -> dict:
    """What a scan's preprocessed folder depends on: the input file and the config section."""
    import hashlib
    import json
    import os

    stat = os.stat(path)
    digest = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    return {
        "input_file": os.path.abspath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "config_sha256": digest.hexdigest()[:16],
    }


def _is_done(folder: Path, signature: dict) -> bool:
    import json

    marker = folder / SIGNATURE_FILE
    try:
        return json.loads(marker.read_text()) == signature
    except (OSError, ValueError):
        return False


def _crash_record(scan: dict, out_dir: Path, reason: str) -> dict:
    import json

    record = {
        "participant_id": scan.get("participant_id"),
        "session_id": scan.get("session_id"),
        "scan_id": scan["scan_id"],
        "input_file": str(scan["path"]),
        "status": "excluded",
        "reason": reason,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{scan['scan_id']}_qc.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
    return record


def preprocess_batch(
    scans: list[dict],
    preproc_dir: str | os.PathLike,
    config: dict | None,
    workers: int = 1,
    log_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Preprocess many scans in one job: imports and template grids once, each scan isolated.

    The parent process imports the preprocessing code and builds the template grids, then forks
    one child per scan (at most ``workers`` at a time): a child inherits everything already
    loaded, preprocesses its scan into ``<preproc_dir>/<scan_id>/`` and exits. A bad scan is an
    exclusion (:func:`preprocess_or_exclude`), and a child that dies (a crash in a library, the
    kernel's out-of-memory killer) only loses its own scan, recorded as excluded with the
    signal. A scan whose folder already holds a signature matching its input file and the
    configuration is skipped, so a re-run (a killed job, a batch that gained a new scan) redoes
    only what is missing.

    Args:
        scans: one mapping per scan: ``scan_id``, ``path``, ``participant_id``, ``session_id``.
        preproc_dir: the workflow's preprocessing folder.
        config: the ``preprocessing:`` section.
        workers: scans preprocessed at the same time (one process each).
        log_dir: a ``<scan_id>.log`` per scan goes here (the scan's warnings and tracebacks).

    Returns:
        One row per scan: ``scan_id``, ``status``, ``reason``, ``skipped`` (already done).
    """
    import json

    preproc_dir = Path(preproc_dir)
    log = logging.getLogger("nidl_dino.preprocess")
    # Paid once for the whole batch, before any fork: the heavy imports and the template grids.
    from nidl_dino.preprocessing import merge_config
    from nidl_dino.preprocessing.template import brain_volume_ml_1mm, template_1mm, template_at

    cfg = merge_config(config)
    template_1mm()
    brain_volume_ml_1mm()
    template_at(float(cfg["resample"]["spacing_mm"]))

    todo, results = [], {}
    for scan in scans:
        folder = preproc_dir / scan["scan_id"]
        signature = input_signature(scan["path"], config)
        if _is_done(folder, signature):
            record = json.loads((folder / f"{scan['scan_id']}_qc.json").read_text())
            results[scan["scan_id"]] = {
                "status": record["status"],
                "reason": record["reason"],
                "skipped": True,
            }
        else:
            todo.append((scan, signature))
    log.info(
        "preprocessing %d scan(s) with %d process(es); %d already done",
        len(todo),
        max(1, workers),
        len(scans) - len(todo),
    )
    running: dict[int, tuple[dict, dict]] = {}
    queue = list(todo)
    done = 0

    def reap(block: bool) -> None:
        nonlocal done
        pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        if pid == 0:
            return
        scan, signature = running.pop(pid)
        folder = preproc_dir / scan["scan_id"]
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            record = _crash_record(
                scan,
                folder,
                f"preprocessing crashed ({why}); delete {folder} and re-run to retry",
            )
            log.error("%s: preprocessing crashed (%s)", scan["scan_id"], why)
        else:
            record = json.loads((folder / f"{scan['scan_id']}_qc.json").read_text())
            (folder / SIGNATURE_FILE).write_text(json.dumps(signature) + "\n")
        results[scan["scan_id"]] = {
            "status": record["status"],
            "reason": record["reason"],
            "skipped": False,
        }
        done += 1
        if done % max(1, len(todo) // 10) == 0 or done == len(todo):
            log.info("preprocessed %d of %d scan(s)", done, len(todo))

    while queue or running:
        while queue and len(running) < max(1, workers):
            scan, signature = queue.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: one scan, then exit without running the parent's cleanup
                code = 0
                try:
                    _preprocess_child(scan, preproc_dir, config, log_dir)
                except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (scan, signature)
        reap(block=True)
    return [{"scan_id": s["scan_id"], **results[s["scan_id"]]} for s in scans]


def _preprocess_child(scan: dict, preproc_dir: Path, config: dict | None, log_dir: Any) -> None:
    handlers: list[logging.Handler] = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.FileHandler(
                Path(log_dir) / f"{scan['scan_id']}.log", mode="w", encoding="utf-8"
            )
        )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers or [logging.StreamHandler(sys.stderr)],
        force=True,
    )
    preprocess_or_exclude(
        scan["path"],
        str(Path(preproc_dir) / scan["scan_id"]),
        prefix=scan["scan_id"],
        config=config,
        ids={"participant_id": scan.get("participant_id"), "session_id": scan.get("session_id")},
    )
