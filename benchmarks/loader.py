"""Training input throughput: volumes/s per loader worker for each input path, and the steps/s
they imply for a GPU.

One command, two markdown tables (the machine named above them)::

    python benchmarks/loader.py                # about 1 minute on a 2-core CPU
    python benchmarks/loader.py --repeats 5    # a smoke test

Per worker (one process, one torch thread, as a DataLoader worker runs), on a 128^3 float32
head-like phantom (benchmarks/training_speed.py's), page cache warm, median of ``--repeats``:

- decode ``.nii.gz`` (MONAI ``LoadImage``, what ``data.cache: none`` pays every fetch and the
  first epoch of any cache pays once);
- read an uncompressed ``.nii``;
- read the disk cache (``data.cache: disk``: an uncompressed ``.npy`` through a memory map,
  :class:`~nidl_dino.training.volume_cache.NpyVolumeCache`);
- a memory-cache hit (``data.cache: memory``: the tensor is already in RAM);
- make the CPU views of one volume (2 x 96^3 + 6 x 48^3 with config.yaml's noise and blur).

Per batch: the worker's collate (stacking 8 volumes, 64 MiB at 128^3), and one serial copy of
the batch in the main process (what the pin-memory thread does before the host-to-device copy;
a plain memcpy here, a lower bound of the pinned copy), which no number of workers shares out.

Implied steps/s at batch 8 with W workers: ``W / (8 x seconds per volume + collate)``, with
the views made by the
workers (read + views per volume) and with the views on the device (read only: the views' cost
on the GPU is excluded, see benchmarks/gpu_check.py for it). Workers are assumed to scale
linearly with the CPUs, which holds while the node has that many free cores and the page cache
holds the volumes. The serial copy's ceiling applies to every row and is printed apart: it
depends on the node's memory bandwidth, not on the workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from training_speed import phantom

from nidl_dino.machine import describe_machine

BATCH = 8
WORKERS = (8, 16)


def seconds_per_call(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def views_128() -> dict:
    """config.yaml's views, at the README's sizes for 128^3 volumes (96 global, 48 local)."""
    views = yaml.safe_load((REPO / "config.yaml").read_text())["views"]
    return {**views, "global_size": 96, "local_size": 48, "num_local_crops": 6}


def measure(folder: Path, size: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per volume of each input path; seconds of the CPU views (per volume), of the
    collate and of the serial copy (per batch)."""
    from nidl_dino.training.data import VolumeDataset
    from nidl_dino.views.crops import MultiCropTransform

    volume = phantom(size)
    gz, raw = folder / "sub-0_T1w.nii.gz", folder / "sub-0_T1w.nii"
    for path in (gz, raw):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    disk = VolumeDataset([gz], cache="disk", cache_dir=folder / "cache")
    disk[0]  # writes the .npy
    paths = {
        ".nii.gz decode": VolumeDataset([gz], cache="none"),
        ".nii (uncompressed)": VolumeDataset([raw], cache="none"),
        "disk cache (.npy memmap)": disk,
        "memory cache": VolumeDataset([gz], cache="memory"),
    }
    reads = {name: seconds_per_call(lambda d=d: d[0], repeats) for name, d in paths.items()}
    views = MultiCropTransform(**views_128()).set_random_state(0)
    cached = paths["memory cache"][0]
    costs = {"views": seconds_per_call(lambda: views(cached), max(3, repeats // 2))}
    batch = [cached.clone() for _ in range(BATCH)]
    costs["collate"] = seconds_per_call(lambda: torch.stack(batch), repeats)
    stacked = torch.stack(batch)
    target = torch.empty_like(stacked)
    costs["copy"] = seconds_per_call(lambda: target.copy_(stacked), repeats)
    return reads, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="volume edge in voxels")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(prefix="nidl-loader-") as tmp:
        reads, costs = measure(Path(tmp), args.size, args.repeats)
    views, collate, copy = costs["views"], costs["collate"], costs["copy"]
    size = args.size
    print(f"\n## loader: one worker, {size}^3 float32 volume ({4 * size**3 / 2**20:.0f} MiB)\n")
    print("| input path | ms per volume | volumes/s per worker |")
    print("|---|---|---|")
    for name, seconds in reads.items():
        print(f"| {name} | {1e3 * seconds:.1f} | {1 / seconds:.0f} |")
    print(f"| CPU views (2 x 96^3 + 6 x 48^3) | {1e3 * views:.1f} | {1 / views:.1f} |")
    mib = BATCH * 4 * size**3 / 2**20
    print(
        f"\nper batch of {BATCH} ({mib:.0f} MiB): collate in the worker {1e3 * collate:.1f} ms; "
        f"serial copy in the main process {1e3 * copy:.1f} ms ({mib / 1024 / copy:.1f} GiB/s), "
        f"a ceiling of {1 / copy:.0f} steps/s whatever the workers"
    )
    head = " | ".join(
        f"{w} workers, {mode}" for w in WORKERS for mode in ("CPU views", "device views")
    )
    print(f"\n## implied training steps/s at batch {BATCH} (views' cost on the GPU excluded)\n")
    print(f"| input path | {head} |")
    print("|---|" + "---|" * (2 * len(WORKERS)))
    for name, seconds in reads.items():
        cells = []
        for workers in WORKERS:
            for per_volume in (seconds + views, seconds):
                rate = workers / (BATCH * per_volume + collate)
                cells.append(f"{rate:.1f}" if rate < 20 else f"{rate:.0f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
