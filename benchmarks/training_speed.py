"""Training speed of nidl-dino: view generation, encoder training steps, data waiting.

One command, one markdown table (with the machine named above it)::

    python benchmarks/training_speed.py            # about 5 minutes on a 2-core CPU
    python benchmarks/training_speed.py --quick    # fewer repetitions, a smoke test

Rows:

- views per second of one loader worker (one thread) on the CPU, for a realistic size
  (128^3 volume to 2 x 96^3 + 8 x 48^3) and the demo size (64^3 to 2 x 48^3 + 8 x 24^3), from a
  cached volume and from a .nii.gz read each time;
- the host-side cost of making views on the device (tiny volumes on the CPU: Python and
  per-transform overhead only, the ceiling of ``views_on_device``), and with a GPU the real rate;
- training steps per second and peak memory of each registry encoder at a small size on the
  CPU (each in a fresh process; memory is the peak resident size above the process's size before
  the model was built);
- with a GPU: each encoder's steps per second at the realistic size, then whole-pipeline runs
  (workers making the views vs. views made on the GPU) with the fraction of the step time spent
  waiting for data; without a GPU, the demo pipeline on the CPU.

Volumes are synthetic head-like phantoms (an ellipsoid "brain" with smooth texture and noise) so
that .nii.gz sizes and reading times are realistic; no data is downloaded.
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

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch

REALISTIC = {"volume": 128, "global_size": 96, "local_size": 48, "num_local_crops": 8}
DEMO = {"volume": 64, "global_size": 48, "local_size": 24, "num_local_crops": 8}
# Small CPU size for the encoder rows: DenseNet121 needs >= 29 voxels, the ViT multiples of 16.
SMALL = {"global_size": 48, "local_size": 32, "num_local_crops": 4, "batch_size": 4}
GPU_SIZE = {"global_size": 96, "local_size": 48, "num_local_crops": 8, "batch_size": 16}
ENCODERS = ["small_cnn", "resnet10", "resnet18", "resnet34", "resnet50", "densenet121", "vit"]

from nidl_dino.machine import describe_machine


def machine() -> str:
    return describe_machine()


def phantom(size: int, seed: int = 0) -> np.ndarray:
    """Head-like test volume (size^3 float32, z-scored inside the head)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.75, 0.9, 0.8])[:, None, None, None]) ** 2).sum(0))
    texture = torch.nn.functional.avg_pool3d(
        torch.from_numpy(rng.standard_normal((1, size, size, size)).astype(np.float32)),
        5,
        stride=1,
        padding=2,
    )[0].numpy()
    volume = np.where(radius < 1.0, 1.0 + 2.0 * texture, 0.0) + 0.05 * rng.standard_normal(
        radius.shape
    )
    volume = (volume - volume[radius < 1].mean()) / volume[radius < 1].std()
    return volume.astype(np.float32)


def write_phantoms(folder: Path, size: int, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = folder / f"sub-{size}x{i:03d}_T1w.nii.gz"
        if not path.exists():
            nib.save(nib.Nifti1Image(phantom(size, seed=i), np.eye(4)), path)
        paths.append(str(path))
    return paths


def views_config(setting: dict) -> dict:
    from nidl_dino.views.crops import DEFAULT_VIEWS_CONFIG

    keys = ("global_size", "local_size", "num_local_crops")
    return {**DEFAULT_VIEWS_CONFIG, **{k: setting[k] for k in keys}}


def bench_views(setting: dict, folder: Path, repeats: int) -> list[dict]:
    """Views per second of one worker, from a cached volume and from a .nii.gz file."""
    from nidl_dino.training.data import VolumeDataset
    from nidl_dino.views.crops import MultiCropTransform

    size = setting["volume"]
    n_views = 2 + setting["num_local_crops"]
    label = (
        f"{size}^3 -> 2 x {setting['global_size']}^3 + {setting['num_local_crops']} x "
        f"{setting['local_size']}^3"
    )
    transform = MultiCropTransform(**views_config(setting)).set_random_state(0)
    paths = write_phantoms(folder, size, 2)
    rows = []
    for source, dataset in (
        ("cached volume", VolumeDataset(paths, transform, cache="memory", cache_num_workers=1)),
        ("read .nii.gz", VolumeDataset(paths, transform, cache="none")),
    ):
        dataset[0]  # warm-up
        start = time.process_time()  # CPU time of this single-threaded worker
        for i in range(repeats):
            dataset[i % len(paths)]
        seconds = (time.process_time() - start) / repeats
        rows.append(
            {
                "what": f"views, 1 CPU worker, {source}",
                "config": label,
                "rate": f"{n_views / seconds:.0f} views/s ({1 / seconds:.1f} volumes/s)",
            }
        )
    return rows


def bench_device_views(setting: dict, device: str, batch: int, repeats: int) -> dict:
    """Views made from a batch of volumes on ``device`` (the ``views_on_device`` path).

    On the CPU with tiny volumes the compute is negligible: the rate is the ceiling that the
    per-transform Python and kernel-launch overhead puts on the device path.
    """
    from nidl_dino.views.crops import MultiCropTransform
    from nidl_dino.views.device import DeviceViews

    device_views = DeviceViews(MultiCropTransform(**views_config(setting)))
    size = setting["volume"]
    volumes = torch.from_numpy(np.stack([phantom(size, i)[None] for i in range(batch)]))
    volumes = volumes.to(device)
    device_views(volumes, 0)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.process_time
    sync()
    start = clock()
    for seed in range(repeats):
        device_views(volumes, seed)
    sync()
    seconds = (clock() - start) / (repeats * batch)
    n_views = 2 + setting["num_local_crops"]
    return {
        "what": (
            f"views_on_device, batch of {batch} on {device}"
            + (" (host overhead only: tiny volumes)" if device == "cpu" else "")
        ),
        "config": (
            f"{size}^3 -> 2 x {setting['global_size']}^3 + {setting['num_local_crops']} x "
            f"{setting['local_size']}^3"
        ),
        "rate": f"{n_views / seconds:.0f} views/s ({1 / seconds:.1f} volumes/s)",
    }


class StepTimer(pl.Callback):
    """Times each training step and the wait for its batch (fetch, transfer, device views)."""

    def __init__(self, warmup: int, clock=time.perf_counter) -> None:
        self.warmup = warmup
        self.clock = clock
        self.steps: list[float] = []
        self.waits: list[float] = []
        self._start = self._end = 0.0
        self._seen = 0  # batches so far, across epochs (batch_idx restarts each epoch)

    @staticmethod
    def _sync(module: pl.LightningModule) -> None:
        if module.device.type == "cuda":  # CUDA runs asynchronously: time finished work only
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._start = self.clock()
        if self._seen >= self.warmup:
            self.waits.append(self._start - self._end)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        self._end = self.clock()
        if self._seen >= self.warmup:
            self.steps.append(self._end - self._start)
        self._seen += 1


def make_dino(encoder, num_local_crops: int, max_steps: int, accelerator: str, callbacks):
    from nidl_dino import DINO

    return DINO(
        encoder,
        proj_input_dim=encoder.output_dim,
        proj_batch_norm=not encoder.__class__.__name__.startswith("ViT"),
        num_local_crops=num_local_crops,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        random_state=0,
    )


def one_encoder(name: str, device: str, setting: dict, steps: int) -> dict:
    """Run in a fresh process: steps/s and peak memory of DINO training with one encoder."""
    from nidl_dino.encoders.networks import build_encoder

    g, loc, n_local, batch = (
        setting[k] for k in ("global_size", "local_size", "num_local_crops", "batch_size")
    )
    views = [torch.randn(batch, 1, g, g, g) for _ in range(2)]
    views += [torch.randn(batch, 1, loc, loc, loc) for _ in range(n_local)]
    warmup = 2
    loader = torch.utils.data.DataLoader([views] * (steps + warmup), batch_size=None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    encoder = build_encoder(name, image_size=[[g] * 3, [loc] * 3])
    # On the CPU, count the process's CPU time: one thread, so it is the work done whatever else
    # runs on the machine. On the GPU, wall time (after synchronising).
    timer = StepTimer(warmup, time.perf_counter if device == "cuda" else time.process_time)
    accelerator = "gpu" if device == "cuda" else "cpu"
    model = make_dino(encoder, n_local, steps + warmup, accelerator, [timer])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.fit(loader)
    if device == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = f"{peak - rss_before:.0f} MiB"
    return {"rate": len(timer.steps) / sum(timer.steps), "memory": memory}


def bench_encoders(device: str, setting: dict, steps: int, threads: int, names) -> list[dict]:
    label = (
        f"B={setting['batch_size']}, 2 x {setting['global_size']}^3 + "
        f"{setting['num_local_crops']} x {setting['local_size']}^3, default head"
    )
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one-encoder", name, "--device", device]
        cmd += ["--steps", str(steps), "--threads", str(threads), "--setting", json.dumps(setting)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"what": f"DINO step, {name} ({device})", "config": label, "rate": tail})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "what": f"DINO step, {name} ({device})",
                "config": label,
                "rate": f"{result['rate']:.2f} steps/s",
                "memory": result["memory"],
            }
        )
    return rows


def bench_pipeline(
    device: str, setting: dict, folder: Path, workers: int, on_device: bool, steps: int
) -> dict:
    """Whole pipeline (NIfTI -> cached volumes -> views -> DINO step): steps/s and data wait."""
    from nidl_dino.encoders.networks import build_encoder
    from nidl_dino.training.data import DINODataModule

    batch = setting["batch_size"]
    paths = write_phantoms(folder, setting["volume"], max(2 * batch, 8))
    dm = DINODataModule(
        paths,
        views_config(setting),
        batch_size=batch,
        num_workers=workers,
        cache="memory",
        views_on_device=on_device,
        seed=0,
    )
    encoder = build_encoder(setting["encoder"], image_size=dm.image_sizes)
    warmup = 2
    timer = StepTimer(warmup)
    accelerator = "gpu" if device == "cuda" else "cpu"
    model = make_dino(encoder, dm.num_local_crops, steps + warmup, accelerator, [timer])
    model.fit(None, datamodule=dm)
    step, wait = sum(timer.steps), sum(timer.waits)
    where = "views on the GPU" if on_device else f"{workers} CPU worker(s)"
    return {
        "what": f"pipeline, {setting['encoder']} ({device}), {where}",
        "config": (
            f"B={batch}, {setting['volume']}^3 -> 2 x {setting['global_size']}^3 + "
            f"{setting['num_local_crops']} x {setting['local_size']}^3"
        ),
        "rate": f"{len(timer.steps) / (step + wait):.2f} steps/s",
        "wait": f"{wait / (step + wait):.0%}",
    }


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def print_table(rows: list[dict], threads: int, load: str) -> None:
    print(f"Machine: {machine()}")
    print(
        f"torch threads per process: {threads}; 1-minute load average at start/end: "
        f"{load}/{load_average()}. Views and CPU steps are timed in process CPU time (one "
        "thread), pipelines in wall time.\n"
    )
    print("| measurement | configuration | rate | peak memory | waiting for data |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = (r["what"], r["config"], r["rate"], r.get("memory", ""), r.get("wait", ""))
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--encoders", nargs="*", default=ENCODERS, help="registry names")
    parser.add_argument("--one-encoder", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per encoder")
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.one_encoder:
        result = one_encoder(args.one_encoder, args.device, json.loads(args.setting), args.steps)
        print(json.dumps(result))
        return

    repeats = 3 if args.quick else 10
    steps = 1 if args.quick else args.steps
    cuda = torch.cuda.is_available()
    rows: list[dict] = []
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows += bench_views(REALISTIC, folder, repeats)
        rows += bench_views(DEMO, folder, 3 * repeats)
        tiny = {"volume": 16, "global_size": 8, "local_size": 4, "num_local_crops": 8}
        rows.append(bench_device_views(tiny, "cpu", 8, repeats))
        if cuda:
            rows.append(bench_device_views(REALISTIC, "cuda", 16, repeats))
        rows += bench_encoders("cpu", SMALL, steps, args.threads, args.encoders)
        if cuda:
            rows += bench_encoders("cuda", GPU_SIZE, 5 * steps, args.threads, args.encoders)
            gpu_pipeline = {**REALISTIC, **GPU_SIZE, "encoder": "resnet18"}
            workers = max(1, (os.cpu_count() or 2) - 1)
            for on_device in (False, True):
                rows.append(
                    bench_pipeline("cuda", gpu_pipeline, folder, workers, on_device, 10 * steps)
                )
        else:
            demo = {**DEMO, "batch_size": 8, "encoder": "small_cnn"}
            rows.append(bench_pipeline("cpu", demo, folder, 1, False, 3 * steps))
    print_table(rows, args.threads, load)


if __name__ == "__main__":
    main()
