"""Peak memory of nidl-dino's heavy steps: preprocessing, feature extraction, training.

One command, one markdown table (with the machine named above it)::

    python benchmarks/memory.py            # about 2-3 minutes on a 2-core CPU
    python benchmarks/memory.py --quick    # without the preprocessing row (the slowest)

Each row runs in a fresh process with one torch/ITK/BLAS thread, so the numbers do not mix. In
that process the libraries are imported first; its resident size then is the "after imports"
column. The peak resident size (Linux ``VmHWM``) is reset through ``/proc/self/clear_refs``
and read again after the work: "peak" is the process's peak during the work, "work" the peak
above the after-imports size (what the step itself costs). Loader worker processes, where the
configuration has any, are measured apart (the largest worker's peak, ``RUSAGE_CHILDREN``).

Rows:

- preprocessing (``nidl_dino.preprocessing.preprocess_scan``, default configuration) of one
  T1w-like 1 mm 256^3 head, built from nilearn's MNI152 template
  (:mod:`nidl_dino.preprocessing.phantom`) with a rotation, bias field and noise;
- feature extraction (``nidl_dino.features.extract.extract_features``) with ``small_cnn`` on 64^3 and
  128^3 volumes, batches of 1 and 4 (two batches each, .nii.gz read by MONAI);
- training (``nidl_dino.training.run.train_from_config``) at the demo configuration of
  ``config.yaml`` (small_cnn, 64^3 volumes, its views, batch 8, one loader
  worker, memory cache, checkpoints and logs) for 3 optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)
EXTRACTION = [(64, 1), (64, 4), (128, 1), (128, 4)]  # (volume size, batch size)
TRAIN_VOLUMES, TRAIN_SIZE, TRAIN_STEPS = 16, 64, 3

from nidl_dino.machine import describe_machine


def machine() -> str:
    return describe_machine()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- measured in the child
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # not Linux, or not allowed: the peak then includes the imports
        return False


def _preprocess(params: dict, folder: Path) -> str:
    from nidl_dino.preprocessing import preprocess_scan

    record = preprocess_scan(params["input"], folder / "preproc", "sub-bench")
    if record["status"] != "ok":
        raise RuntimeError(f"benchmark scan excluded: {record['reason']}")
    return f"{record['timings_s']['total']:.0f} s in the pipeline"


def _extract(params: dict, folder: Path) -> str:
    import numpy as np

    from nidl_dino.encoders.networks import build_encoder
    from nidl_dino.features.extract import extract_features

    encoder = build_encoder("small_cnn").eval()
    features = extract_features(
        encoder, params["paths"], batch_size=params["batch"], accelerator="cpu"
    )
    assert features.shape == (len(params["paths"]), encoder.output_dim)
    assert np.isfinite(features).all()
    return f"{len(params['paths']) // params['batch']} batches"


def _views_text() -> str:
    """config.yaml's training views, e.g. ``2 x 48x48x48 + 2 x 24x24x24``."""
    import yaml

    views = yaml.safe_load((ROOT / "config.yaml").read_text())["views"]
    globals_, locals_ = views["global_size"], views["local_size"]
    text = f"2 x {'x'.join(map(str, globals_))}"
    if views["num_local_crops"]:
        text += f" + {views['num_local_crops']} x {'x'.join(map(str, locals_))}"
    return text


def _train(params: dict, folder: Path) -> str:
    import yaml

    from nidl_dino.training.run import train_from_config

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["encoder"] = {"name": "small_cnn", "kwargs": {}}
    config["data"]["batch_size"] = 8
    config["trainer"].update(
        accelerator="cpu", max_steps=params["steps"], enable_progress_bar=False
    )
    summary = train_from_config(params["paths"], config, folder / "work", folder / "teacher.pt")
    return f"{summary['global_step']} steps"


def child(kind: str, params: dict, folder: str) -> dict:
    """Run in a fresh process: import, note the resident size, reset the peak, work."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # What the step's workflow job imports, before the measured work.
    if kind == "preprocess":  # no torch in a preprocessing job
        import ants  # noqa: F401
        import matplotlib.figure  # noqa: F401

        import nidl_dino.preprocessing  # noqa: F401
    else:
        import torch

        torch.set_num_threads(1)
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning").setLevel(logging.ERROR)
        import lightning_fabric  # noqa: F401
        import monai.data  # noqa: F401

        import nidl_dino.encoders.networks  # noqa: F401
        import nidl_dino.features.extract  # noqa: F401
        import nidl_dino.training.data  # noqa: F401

        if kind == "train":
            import matplotlib.pyplot  # noqa: F401  (training curves)

            import nidl_dino.training.run  # noqa: F401

    imports_mb = _status_mb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    note = {"preprocess": _preprocess, "extract": _extract, "train": _train}[kind](
        params, Path(folder)
    )
    seconds = time.perf_counter() - start
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "imports_mb": imports_mb,
        "peak_mb": _status_mb("VmHWM"),
        "peak_reset": reset,
        "workers_mb": workers_kb / 1024 if workers_kb else None,
        "seconds": seconds,
        "note": note,
    }


# ---------------------------------------------------------------- driven by the parent
def run_child(kind: str, params: dict, folder: Path) -> dict:
    env = dict(os.environ, **{name: "1" for name in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", kind, json.dumps(params), str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_head_256(path: Path) -> None:
    """A T1w-like 1 mm 256^3 head (int16 .nii.gz, sagittal storage, rotated and shifted)."""
    from nidl_dino.preprocessing.phantom import save_benchmark_head

    save_benchmark_head(path, (256, 256, 256))


def make_volumes(folder: Path, size: int, count: int) -> list[str]:
    """Preprocessed-like volumes: a smooth ellipsoid "brain" with texture, z-scored, float32."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    paths = []
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.75, 0.9, 0.8])[:, None, None, None]) ** 2).sum(0))
    for i in range(count):
        rng = np.random.default_rng(i)
        texture = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), 2.0)
        volume = np.where(radius < 1.0, 1.0 + 4.0 * texture, 0.0)
        volume = (volume - volume.mean()) / volume.std()
        path = folder / f"vol-{size}-{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), path)
        paths.append(str(path))
    return paths


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the preprocessing row")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, params, folder = args.child
        print(json.dumps(child(kind, json.loads(params), folder)))
        return

    rows: list[tuple[str, str, dict]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nidl_dino_memory_") as tmp:
        folder = Path(tmp)
        what = "preprocessing, default configuration (N4, ANTs affine, 1.5 mm grid)"
        config = "one T1w-like head, 1 mm, 256^3, int16 .nii.gz"
        if args.quick:
            rows.append((what, config, {"error": "skipped (--quick)"}))
        else:
            try:
                import nidl_dino.preprocessing  # noqa: F401
            except ImportError as err:
                rows.append((what, config, {"error": f"not importable yet ({err})"}))
            else:
                head = folder / "sub-bench_T1w.nii.gz"
                make_head_256(head)
                rows.append((what, config, run_child("preprocess", {"input": str(head)}, folder)))
        for size, batch in EXTRACTION:
            paths = make_volumes(folder, size, 2 * batch)
            result = run_child("extract", {"paths": paths, "batch": batch}, folder)
            config = f"small_cnn (128 features), {size}^3 float32 .nii.gz, batch {batch}"
            rows.append(("feature extraction", config, result))
        paths = make_volumes(folder, TRAIN_SIZE, TRAIN_VOLUMES)
        result = run_child("train", {"paths": paths, "steps": TRAIN_STEPS}, folder)
        config = (
            f"demo config.yaml: small_cnn, {TRAIN_SIZE}^3 volumes, {_views_text()} views, "
            f"batch 8, head 512/128/1024, 1 loader worker, memory cache, {TRAIN_STEPS} steps"
        )
        rows.append(("DINO training (train_from_config)", config, result))

    print(f"Machine: {machine()}")
    print(
        "Each row in a fresh process, 1 thread. after imports: resident size once the "
        "libraries are imported; peak: peak resident size during the work; work: peak minus "
        f"after imports. Total benchmark time {time.perf_counter() - start:.0f} s.\n"
    )
    print("| measurement | configuration | after imports | peak | work | loader worker peak "
          "| time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for what, config, r in rows:
        if "error" in r:
            print(f"| {what} | {config} | {r['error']} | | | | |")
            continue
        peak = r["peak_mb"] if r["peak_reset"] else float("nan")
        cells = [
            what,
            config,
            mb(r["imports_mb"]),
            mb(r["peak_mb"]),
            mb(peak - r["imports_mb"]),
            mb(r["workers_mb"]),
            f"{r['seconds']:.0f} s ({r['note']})",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
