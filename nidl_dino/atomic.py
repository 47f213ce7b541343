"""Writing a file so that a reader never sees it half-written: one atomic writer for the package.

Every output (tables, volumes, the teacher, JSON records, HTML pages) is written under a hidden
temporary name in its final folder and renamed into place (an atomic ``os.replace``), so a job
killed mid-write leaves no truncated file under the final name; the file gets the mode of an
ordinary new file (``0o666`` less the umask), so a lab's shared storage shows it to colleagues.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the body succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.mat``), because writers pick
    the format from them; it is hidden (leading dot) and in the same folder, so ``os.replace``
    is an atomic rename and a killed job never leaves a half-written file under the final name.
    The file gets the mode of an ordinary new file (``0o666`` less the umask), not
    ``mkstemp``'s private ``0o600``: on a lab's shared storage colleagues must read the outputs.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once; no other API)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
