"""The code style CI holds us to: ruff's lint and format on every Python file of the repository."""

from __future__ import annotations

import subprocess
import sys

from workflow_helpers import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True
    )


def test_ruff_lint_is_clean():
    res = _ruff("check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_is_clean():
    res = _ruff("format", "--check", "--no-cache", "nidl_dino", "tests", "pipeline", "benchmarks")
    assert res.returncode == 0, res.stdout + res.stderr
