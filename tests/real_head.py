"""A real head for the tests: Debian's ``mricron-data`` package (Colin27 ``ch2`` and friends).

The package ships ``usr/share/mricron/templates/``: ``ch2.nii.gz`` (a real single-subject
whole-head T1w, 1 mm, skull and scalp, 181 x 217 x 181 uint8, already close to MNI space),
``ch2better.nii.gz`` (the same head at 0.5 mm), ``ch2bet.nii.gz`` (skull-stripped) and
``inia19-t1-brain.nii.gz`` (a macaque brain). It is fetched with ``apt-get download`` (no
install, no root needed) into a cache folder and unpacked with ``dpkg -x``; later runs reuse it.

The cache folder is ``$NIDL_DINO_MRICRON_DIR`` if set, else ``~/.cache/nidl-dino/mricron``.
Also used by ``benchmarks/`` (imported from there with this folder on ``sys.path``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

FILES = ("ch2.nii.gz", "ch2better.nii.gz", "ch2bet.nii.gz", "inia19-t1-brain.nii.gz")
PACKAGE = "mricron-data"
_INSIDE = Path("usr/share/mricron/templates")


class Unavailable(RuntimeError):
    """The package cannot be obtained here; the message is the one-line reason."""


def cache_dir() -> Path:
    """The folder holding the downloaded .deb and its unpacked tree."""
    env = os.environ.get("NIDL_DINO_MRICRON_DIR")
    return Path(env) if env else Path.home() / ".cache" / "nidl-dino" / "mricron"


def mricron_files() -> dict[str, Path]:
    """The four volumes as ``{file name: path}``, downloading and unpacking them once.

    Raises:
        Unavailable: apt-get or dpkg missing, the download failed, or the package lacks a file.
    """
    root = cache_dir()
    paths = {name: root / "root" / _INSIDE / name for name in FILES}
    if all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    # test workers (pytest-xdist) may ask at once: one downloads, the others wait and reuse it
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(p.is_file() for p in paths.values()):
            return paths
        return _fetch(root, paths)


def _fetch(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    tree = root / "root"
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not found: cannot obtain {PACKAGE} (a real head)")
    debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        download = ["apt-get", "download", PACKAGE]
        if _run(download, root) != 0:
            # A fresh machine may have no package lists yet.
            _run(["apt-get", "update"], root)
            if _run(download, root) != 0:
                raise Unavailable(f"apt-get download {PACKAGE} failed (no network or no lists?)")
        debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise Unavailable(f"apt-get download {PACKAGE} wrote no .deb in {root}")
    partial = root / "root.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if _run(["dpkg", "-x", str(debs[-1]), str(partial)], root) != 0:
        raise Unavailable(f"dpkg -x {debs[-1].name} failed")
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise Unavailable(f"{PACKAGE} has no {', '.join(missing)}")
    return paths


def _run(command: list[str], cwd: Path) -> int:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 1
    return done.returncode
