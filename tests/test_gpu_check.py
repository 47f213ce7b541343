"""benchmarks/gpu_check.py runs end to end on the CPU, and fails in one line without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SCRIPT.parents[1],
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_the_check_fails_in_one_line():
    done = run("--device", "cuda", timeout=120)
    assert done.returncode == 1
    failure = [line for line in done.stderr.splitlines() if "gpu_check: FAILED" in line]
    assert len(failure) == 1 and "torch.cuda.is_available() is False" in failure[0]


@pytest.mark.slow  # about 2 minutes on the 2-core CPU (bf16 autocast is slow on CPUs)
def test_quick_cpu_run_prints_the_table_and_succeeds():
    done = run("--device", "cpu", "--quick", "--steps", "6", timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    for measure in (
        "steps/s",
        "data wait fraction",
        "peak memory",
        "extraction subjects/s",
        "bf16 vs fp32 features: median rel. error",
    ):
        assert f"| {measure}" in done.stdout
    assert "gpu_check: OK" in done.stdout
