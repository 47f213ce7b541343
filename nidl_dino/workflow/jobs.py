"""Running workflow jobs: logging to the job's log file, one-line errors for the user, and
preprocessing a batch of scans in one job with each scan isolated in its own process."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nidl_dino.atomic import write_text_atomic
from nidl_dino.errors import UserError
from nidl_dino.workflow.layout import Layout, ScanFiles, preprocess_log_in


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

    The files go to ``out_dir``, named after ``prefix`` (the scan's ``<source>``); the record's
    ``scan_id`` is ``ids["scan_id"]``, or ``prefix`` when not given.

    :func:`nidl_dino.preprocessing.preprocess_scan` already turns every kind of bad input into
    an ``excluded`` record. This guard covers the rest (a library crash on a strange file): the
    scan is excluded with the error as its reason, the traceback goes to the job's log, and the
    other subjects carry on.
    """
    import json
    from pathlib import Path

    from nidl_dino.preprocessing import output_paths, preprocess_scan

    ids = {**(ids or {})}
    ids.setdefault("scan_id", prefix)
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
        path = output_paths(out_dir, prefix, config)["qc_json"]
        write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        return record


def input_signature(path: str | os.PathLike, config: dict | None) -> dict:
    """What a scan's preprocessed files depend on: the input file and the config section.

    Written beside them once they are made (:attr:`nidl_dino.workflow.layout.ScanFiles.signature`); a
    batch job skips a scan whose signature matches and whose files are there.
    """
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


def _done_record(files: ScanFiles, signature: dict) -> dict | None:
    """The QC record of a scan done with ``signature`` whose files are there, else None.

    The record is kept in the signature file, and the picture under a second name
    (:func:`_keep_done`): Snakemake deletes a job's declared outputs (the QC record and picture)
    before it reruns the job, so they are restored from there rather than recomputed.
    """
    import json

    try:
        kept = json.loads(files.signature.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("input") != signature:
        return None
    record = kept.get("record")
    if not isinstance(record, dict) or not files.qc_png_kept.is_file():
        return None
    if record.get("status") == "ok" and not all(
        path.is_file() for path in (files.volume, files.mask, files.transform)
    ):
        return None
    if not files.qc_json.is_file():
        write_text_atomic(files.qc_json, json.dumps(record, indent=2, default=str) + "\n")
    if not files.qc_png.is_file():
        _link_or_copy(files.qc_png_kept, files.qc_png)
    return record


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no space), or a copy where links fail."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _keep_done(files: ScanFiles, signature: dict, record: dict) -> None:
    """Record a finished scan: its signature and QC record, and its picture's second name."""
    import json

    _link_or_copy(files.qc_png, files.qc_png_kept)
    kept = {"input": signature, "record": record}
    write_text_atomic(files.signature, json.dumps(kept, default=str) + "\n")


def _crash_record(scan: dict, files: ScanFiles, reason: str) -> dict:
    import json

    record = {
        "participant_id": scan.get("participant_id"),
        "session_id": scan.get("session_id"),
        "scan_id": scan["scan_id"],
        "input_file": str(scan["path"]),
        "status": "excluded",
        "reason": reason,
    }
    files.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(files.qc_json, json.dumps(record, indent=2, default=str) + "\n")
    from nidl_dino.preprocessing.qc import save_text_png

    save_text_png(files.qc_png, f"{scan['scan_id']}: excluded", reason)
    return record


def preprocess_batch(
    scans: list[dict],
    layout: Layout | str | os.PathLike,
    config: dict | None,
    workers: int = 1,
    log_dir: str | os.PathLike | None = None,
    retry: str = "snakemake --forcerun <its preprocess_batch_NNNN rule>",
) -> list[dict]:
    """Preprocess many scans in one job: imports and template grids once, each scan isolated.

    The parent process imports the preprocessing code and builds the template grids, then forks
    one child per scan (at most ``workers`` at a time): a child inherits everything already
    loaded, preprocesses its scan into its files (:meth:`nidl_dino.workflow.layout.Layout.scan`:
    ``sub-<label>/[ses-<label>/]anat/<source>_...`` below ``output_dir``) and exits. A bad scan
    is an exclusion (:func:`preprocess_or_exclude`), and a child that dies (a crash in a
    library, the kernel's out-of-memory killer) only loses its own scan, recorded as excluded
    with the signal. A scan whose files are all there with a signature matching its
    input file and the configuration is skipped, so a re-run (a killed job, a batch that gained
    a new scan) redoes only what is missing.

    Args:
        scans: one mapping per scan: ``scan_id``, ``path``, ``participant_id``, ``session_id``.
        layout: where the files go, with the scans' source names; its grid spacing is the
            configuration's. A folder: the layout of that ``output_dir``, without source names.
        config: the ``preprocessing:`` section.
        workers: scans preprocessed at the same time (one process each).
        log_dir: a ``<scan_id>.log`` per scan goes here (the scan's warnings and tracebacks).
        retry: the command that reruns this batch, named in a crashed scan's reason.

    Returns:
        One row per scan: ``scan_id``, ``status``, ``reason``, ``skipped`` (already done).

    Raises:
        ValueError: a layout of another grid spacing than the configuration's.
    """
    import json

    log = logging.getLogger("nidl_dino.preprocess")
    # Paid once for the whole batch, before any fork: the heavy imports and the template grids.
    from nidl_dino.preprocessing import merge_config
    from nidl_dino.preprocessing.template import (
        brain_volume_ml_1mm,
        template_1mm,
        template_at,
        tissue_index_at,
    )

    cfg = merge_config(config)
    spacing = float(cfg["resample"]["spacing_mm"])
    template_1mm()
    brain_volume_ml_1mm()
    template_at(spacing)
    template_at(float(cfg["working_spacing_mm"]))
    if cfg["bias_correction"]["template_fit"]["enabled"]:
        tissue_index_at(float(cfg["working_spacing_mm"]))  # the tissue maps: about 1.5 s
    if not isinstance(layout, Layout):
        layout = Layout(layout, spacing)
    if layout.spacing_mm != spacing:  # the files would be named after another grid
        raise ValueError(f"layout of a {layout.spacing_mm} mm grid for a {spacing} mm grid")

    todo, results = [], {}
    for scan in scans:
        signature = input_signature(scan["path"], config)
        record = _done_record(layout.scan(scan["scan_id"]), signature)
        if record is not None:
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
        files = layout.scan(scan["scan_id"])
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            # no signature is written: the next run of its batch job tries the scan again
            record = _crash_record(
                scan,
                files,
                f"preprocessing crashed ({why}); re-run its batch to retry ({retry})",
            )
            log.error("%s: preprocessing crashed (%s)", scan["scan_id"], why)
        else:
            record = json.loads(files.qc_json.read_text())
            _keep_done(files, signature, record)
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
                    _preprocess_child(scan, layout.scan(scan["scan_id"]), config, log_dir)
                except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (scan, signature)
        reap(block=True)
    return [{"scan_id": s["scan_id"], **results[s["scan_id"]]} for s in scans]


def _preprocess_child(scan: dict, files: ScanFiles, config: dict | None, log_dir: Any) -> None:
    handlers: list[logging.Handler] = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.FileHandler(
                preprocess_log_in(log_dir, scan["scan_id"]), mode="w", encoding="utf-8"
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
        str(files.folder),
        prefix=files.source,
        config=config,
        ids={
            "participant_id": scan.get("participant_id"),
            "session_id": scan.get("session_id"),
            "scan_id": scan["scan_id"],
        },
    )
