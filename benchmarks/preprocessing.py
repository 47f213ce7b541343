"""Preprocessing speed and memory per subject, step by step, on one core.

One command, one markdown table per configuration (with the machine named above them)::

    python benchmarks/preprocessing.py             # about 1-2 minutes on a 2-core CPU
    python benchmarks/preprocessing.py --repeats 1 # one subject per configuration

Input: a 1 mm, 256 x 256 x 176 T1w-like head (int16 .nii.gz, sagittal PIL storage, head
rotated by 12/-8/10 degrees, shifted and scaled, with a bias field and Rician noise), built from
the MNI152 template by :mod:`nidl_dino.preprocessing.phantom`; nothing is downloaded.

Each configuration runs in a fresh process pinned to one CPU core with one ITK/BLAS thread.
Subject 1 is "cold" (the process has just imported the libraries and loads the template: what
one Snakemake job per scan pays), later subjects are "warm" (caches filled). Per step: wall
seconds and the peak resident memory during that step (Linux ``VmHWM``, reset before each step
through ``/proc/self/clear_refs``). The import time of the libraries is a row of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "registration on (default, 1.5 mm grid)": {},
    # The input is not in MNI space: without registration its QC similarity fails, which is
    # right, but would skip the writes; the check is off so that every step is timed.
    "registration off (1.5 mm grid)": {
        "registration": {"enabled": False},
        "qc": {"min_similarity": None},
    },
    "registration on, demo 3 mm grid": {"resample": {"spacing_mm": 3.0}},
}
STEPS = [
    "load",
    "reorient",
    "working_image",
    "bias_correction",
    "registration",
    "template_fit",
    "refine_registration",
    "resample",
    "mask_qc",
    "normalization",
    "write",
]

from nidl_dino.machine import describe_machine


def machine() -> str:
    return describe_machine()


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process since the last reset (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: peaks become cumulative
        pass


def make_input(path: Path) -> None:
    """The 1 mm 256 x 256 x 176 T1w-like input (int16 .nii.gz, sagittal storage, rotated and shifted)."""
    from nidl_dino.preprocessing.phantom import save_benchmark_head

    save_benchmark_head(path, (256, 256, 176))


def worker(in_file: str, config: dict, repeats: int, out_dir: str) -> dict:
    """Run in a fresh process: time the imports, then ``repeats`` subjects."""
    _reset_hwm()
    start = time.perf_counter()
    # What a one-scan workflow job imports (ants and matplotlib are imported lazily inside).
    import ants  # noqa: F401
    import matplotlib.figure  # noqa: F401

    from nidl_dino.preprocessing import pipeline, preprocess_scan

    imports = {"seconds": time.perf_counter() - start, "peak_mb": _vm_hwm_mb()}

    peaks: dict[str, float] = {}

    class MemoryClock(pipeline._Clock):
        """The pipeline's step clock, also noting each step's peak memory."""

        def __init__(self, timings):
            super().__init__(timings)
            _reset_hwm()

        def lap(self, name):
            super().lap(name)
            peaks[name] = _vm_hwm_mb()
            _reset_hwm()

    pipeline._Clock = MemoryClock
    subjects = []
    for i in range(repeats):
        peaks.clear()
        _reset_hwm()
        record = preprocess_scan(in_file, out_dir, f"sub-{i:02d}", config=config)
        peaks["write"] = _vm_hwm_mb()  # the writes follow the last lap
        if record["status"] != "ok":
            raise RuntimeError(f"benchmark subject excluded: {record['reason']}")
        subjects.append(
            {
                "timings": record["timings_s"],
                "peaks": dict(peaks),
                "similarity": record["metrics"]["registration_similarity"],
            }
        )
    return {"imports": imports, "subjects": subjects}


def _single_core_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "MKL_NUM_THREADS"):  # fmt: skip
        env[name] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_config(in_file: Path, config: dict, repeats: int, out_dir: Path) -> dict:
    core = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    command = [sys.executable, __file__, "--worker", str(in_file), json.dumps(config),
               str(repeats), str(out_dir)]  # fmt: skip
    if core is not None and Path("/usr/bin/taskset").exists():
        command = ["taskset", "-c", str(core), *command]
    done = subprocess.run(command, env=_single_core_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(name: str, result: dict) -> str:
    subjects = result["subjects"]
    header = "| step | " + " | ".join(
        f"s ({'cold' if i == 0 else 'warm'} #{i + 1}) | peak MB" for i in range(len(subjects))
    )
    lines = [f"### {name}", "", header + " |", "|---" * (1 + 2 * len(subjects)) + "|"]
    imports = result["imports"]
    lines.append(f"| imports (nidl_dino.preprocessing, ants, matplotlib) | {imports['seconds']:.2f} | "
                 f"{imports['peak_mb']:.0f} |" + " - | - |" * (len(subjects) - 1))  # fmt: skip
    for step in [*STEPS, "total"]:
        cells = []
        for s in subjects:
            peak = (
                max(s["peaks"].values()) if step == "total" else s["peaks"].get(step, float("nan"))
            )
            cells.append(f"{s['timings'].get(step, float('nan')):.2f} | {peak:.0f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    similarity = ", ".join(f"{s['similarity']:.3f}" for s in subjects)
    lines.append(f"\nregistration similarity to the template: {similarity}\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="subjects per configuration")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        in_file, config, repeats, out_dir = args.worker
        print(json.dumps(worker(in_file, json.loads(config), int(repeats), out_dir)))
        return

    with tempfile.TemporaryDirectory(prefix="nidl_dino_bench_") as tmp:
        tmp = Path(tmp)
        in_file = tmp / "sub-bench_T1w.nii.gz"
        start = time.perf_counter()
        make_input(in_file)
        print(f"Machine: {machine()}")
        print("One core (taskset), one thread; input 256 x 256 x 176 at 1 mm, int16 .nii.gz "
              f"({in_file.stat().st_size / 1e6:.1f} MB), built in {time.perf_counter() - start:.0f} s.\n")  # fmt: skip
        for name, config in CONFIGS.items():
            result = run_config(in_file, config, args.repeats, tmp / "out")
            print(table(name, result), flush=True)


if __name__ == "__main__":
    main()
