"""The GPU check: the GPU recipe end to end on generated volumes, numbers in one table.

One command, a few minutes on one GPU::

    python benchmarks/gpu_check.py                      # 128^3, resnet18, bf16-mixed, 300 steps
    python benchmarks/gpu_check.py --device cpu --quick # the same code on this CPU, small sizes

It writes head-like phantom volumes (``training_speed.phantom``) to a temporary folder, trains
DINO with the GPU recipe (``precision: bf16-mixed``, ``data.views_on_device: true``, resnet18,
views 96^3 / 48^3 from 128^3) through :class:`~nidl_dino.training.data.DINODataModule` and the
device-dependent Trainer options of :func:`nidl_dino.training.devices.trainer_options` (cudnn.benchmark,
logging interval), then extracts features of every volume with the teacher in float32 and in
bf16-mixed. It prints: training steps/s, the fraction of step time waiting for data (loader,
transfer and device views) and the views' share of it, peak memory, extraction subjects/s, and
the bf16-vs-fp32 feature agreement (per-subject relative L2 error and cosine).

Exits non-zero, with one line, on any failure: no usable device, a non-finite loss or feature, a
run that stopped early, or bf16 features further from fp32 than ``--max-feature-error``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_speed import StepTimer, phantom

from nidl_dino.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILE = REPO / "profiles" / "gpu_recipe.yaml"


def recipe_config() -> dict:
    """config.yaml with the GPU recipe overlaid, as ``--configfile`` does (nested keys merge)."""
    from nidl_dino.settings import with_defaults

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            out[key] = merge(base[key], value) if both else value
        return out

    config = merge(
        yaml.safe_load((REPO / "config.yaml").read_text()),
        yaml.safe_load(RECIPE_FILE.read_text()),
    )
    return with_defaults(config)


RECIPE = recipe_config()
_SIZE = round(
    RECIPE["preprocessing"]["resample"]["fov_mm"][0]
    / RECIPE["preprocessing"]["resample"]["spacing_mm"]
)
GPU_RECIPE = {"size": _SIZE, "global": RECIPE["views"]["global_size"][0],
              "local": RECIPE["views"]["local_size"][0],
              "local_crops": RECIPE["views"]["num_local_crops"],
              "batch": RECIPE["data"]["batch_size"], "subjects": 32, "steps": 300, "workers": 2}  # fmt: skip
QUICK = {"size": 32, "global": 24, "local": 12, "local_crops": 2, "batch": 4,
         "subjects": 8, "steps": 8, "workers": 0}  # fmt: skip
#: The recipe's encoder and DINO settings (config.yaml's dino section; the recipe keeps it).
ENCODER = RECIPE["encoder"]
DINO_SETTINGS = dict(RECIPE["dino"])


class CheckFailed(RuntimeError):
    """A failed check: its message is the one line printed."""


def write_volumes(folder: Path, size: int, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = folder / f"sub-{i:03d}_T1w.nii"  # uncompressed: writing is not what we time
        nib.save(nib.Nifti1Image(phantom(size, seed=i), np.eye(4)), path)
        paths.append(str(path))
    return paths


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def train(paths: list[str], setting: dict, device: str, precision: str, folder: Path):
    from nidl_dino.training.data import DINODataModule
    from nidl_dino.training.devices import trainer_options
    from nidl_dino.training.run import build_model

    views = {
        "global_size": setting["global"],
        "local_size": setting["local"],
        "num_local_crops": setting["local_crops"],
        "local_scale": [(setting["local"] / setting["size"]) ** 3] * 2,
    }
    dm = DINODataModule(
        paths,
        views,
        batch_size=setting["batch"],
        num_workers=setting["workers"],
        cache="memory",
        views_on_device=True,
        seed=0,
    )
    view_times: list[float] = []
    make_views = dm.device_views.__call__

    def timed_views(volumes, seed):
        synchronize(device)
        start = time.perf_counter()
        out = make_views(volumes, seed)
        synchronize(device)
        view_times.append(time.perf_counter() - start)
        return out

    dm.device_views = type("Timed", (), {"__call__": staticmethod(timed_views)})()
    warmup = min(5, setting["steps"] // 4)
    timer = StepTimer(warmup=warmup)
    accelerator = "gpu" if device == "cuda" else "cpu"
    options = trainer_options({"accelerator": accelerator, "devices": 1, "precision": precision})
    model = build_model(
        {"encoder": ENCODER, "dino": DINO_SETTINGS, "seed": 0},
        num_local_crops=dm.num_local_crops,
        image_sizes=dm.image_sizes,
        max_steps=setting["steps"],
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=str(folder),
        **options,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.fit(datamodule=dm)
    steps = int(model.trainer.global_step)
    if steps != setting["steps"]:
        raise CheckFailed(f"training stopped after {steps} of {setting['steps']} steps")
    loss = model.trainer.callback_metrics.get("train/loss_step")
    if loss is None or not torch.isfinite(loss).all():
        raise CheckFailed(f"training loss is not finite: {loss}")
    total = sum(timer.steps) + sum(timer.waits)
    return model, {
        "steps/s": len(timer.steps) / total,
        "data wait fraction": sum(timer.waits) / total,
        "views share of step time": sum(view_times[warmup:]) / total,
        "final loss": float(loss),
        "peak memory (GiB)": peak_memory_gib(device),
    }


def extract(model, paths: list[str], device: str, batch: int) -> dict:
    from nidl_dino.encoders.readout import DEFAULT_POOLING, feature_encoder
    from nidl_dino.features.extract import extract_features

    encoder = feature_encoder(model.teacher.eval(), DEFAULT_POOLING)
    accelerator = "gpu" if device == "cuda" else "cpu"
    extract_features(encoder, paths[:batch], batch, accelerator=accelerator)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    fp32 = extract_features(encoder, paths, batch, accelerator=accelerator, precision="32-true")
    synchronize(device)
    seconds = time.perf_counter() - start
    bf16 = extract_features(encoder, paths, batch, accelerator=accelerator, precision="bf16-mixed")
    if not (np.isfinite(fp32).all() and np.isfinite(bf16).all()):
        raise CheckFailed("extraction gave non-finite features")
    error = np.linalg.norm(bf16 - fp32, axis=1) / np.maximum(np.linalg.norm(fp32, axis=1), 1e-12)
    cosine = (bf16 * fp32).sum(1) / np.maximum(
        np.linalg.norm(bf16, axis=1) * np.linalg.norm(fp32, axis=1), 1e-12
    )
    return {
        "extraction subjects/s (fp32)": len(paths) / seconds,
        "bf16 vs fp32 features: median rel. error": float(np.median(error)),
        "bf16 vs fp32 features: max rel. error": float(error.max()),
        "bf16 vs fp32 features: min cosine": float(cosine.min()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps")
    parser.add_argument("--steps", type=int, help="training steps (default 300, quick 8)")
    parser.add_argument(
        "--workers",
        type=int,
        help="loader processes (default 2, quick 0; the workflow's data.num_workers: auto gives "
        "the train job's threads, 16 in the recipe)",
    )
    parser.add_argument("--max-feature-error", type=float, default=0.05,
                        help="fail when the median bf16-vs-fp32 relative feature error exceeds it")  # fmt: skip
    args = parser.parse_args(argv)
    setting = dict(QUICK if args.quick else GPU_RECIPE)
    if args.steps:
        setting["steps"] = args.steps
    if args.workers is not None:
        setting["workers"] = args.workers
    try:
        if args.device == "cuda":
            from nidl_dino.training.devices import check_gpu

            check_gpu("gpu")
        else:
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
            # oneDNN's bf16 Conv3d weight gradients are at times not finite on some CPUs (AMD
            # EPYC family 26 with AVX512-BF16, torch 2.13.0: 17 of 300 calls of one shape, never
            # with PyTorch's own kernels; benchmarks/README.md, session 21): this CPU stand-in
            # for the GPU check uses PyTorch's kernels, as the GPU uses cuDNN's
            torch.backends.mkldnn.enabled = False
        print(f"# GPU check on: {describe_machine()}")
        print(
            f"# recipe: resnet18, bf16-mixed, views on device, {setting['size']}^3 volumes -> "
            f"2 x {setting['global']}^3 + {setting['local_crops']} x {setting['local']}^3, "
            f"batch {setting['batch']}, {setting['steps']} steps, {setting['subjects']} subjects, {setting['workers']} loader workers"
        )
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            folder = Path(tmp)
            paths = write_volumes(folder, setting["size"], setting["subjects"])
            model, results = train(paths, setting, args.device, "bf16-mixed", folder)
            results.update(extract(model, paths, args.device, setting["batch"]))
        if results["bf16 vs fp32 features: median rel. error"] > args.max_feature_error:
            raise CheckFailed(
                "bf16 features differ from fp32 by "
                f"{results['bf16 vs fp32 features: median rel. error']:.3%} (median) > "
                f"{args.max_feature_error:.1%}"
            )
    except Exception as exc:  # noqa: BLE001 - any failure is one line and a non-zero exit
        print(f"gpu_check: FAILED: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return 1
    print("\n| measure | value |\n|---|---|")
    for key, value in results.items():
        shown = f"{value:.1%}" if "fraction" in key or "share" in key else f"{value:.4g}"
        print(f"| {key} | {shown} |")
    print("\ngpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
