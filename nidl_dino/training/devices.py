"""The device a run uses: loud failures instead of a silent CPU fallback, and device options.

:func:`check_gpu` stops a run that asks for a GPU (``trainer.accelerator: gpu``/``cuda``, or
``auto`` on a node where SLURM or ``CUDA_VISIBLE_DEVICES`` says GPUs were allocated) when torch
cannot use one, with one line naming torch's CUDA build and ``torch.cuda.is_available()``.
Lightning alone would train on the CPU without a word (``auto``) or raise a multi-line error.

:func:`trainer_options` completes the ``trainer:`` section with what depends on the device:

- ``deterministic: true`` becomes ``"warn"`` (``torch.use_deterministic_algorithms(True,
  warn_only=True)``): deterministic kernels wherever torch has them, a warning for the few it has
  none for on CUDA (the backward of ``AdaptiveAvgPool3d`` and of trilinear interpolation), where
  ``True`` would raise at the first step. ``"strict"`` asks for torch's raising mode.
- ``benchmark`` (``torch.backends.cudnn.benchmark``) on for GPU runs unless deterministic:
  cuDNN picks the fastest 3D convolution for each of the (few, fixed) view shapes.
- ``sync_batchnorm`` when more than one GPU process trains (``devices`` x ``num_nodes`` > 1):
  batch statistics over the global batch, as a single process would compute them. torch's
  ``SyncBatchNorm`` has no CPU kernel, so CPU (gloo) runs keep per-process BatchNorm.
- ``log_every_n_steps``: :data:`DEFAULT_LOG_EVERY_N_STEPS` unless given (metrics leave the
  device only when logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from nidl_dino.errors import UserError
from nidl_dino.settings import defaults

__all__ = [
    "DEFAULT_LOG_EVERY_N_STEPS",
    "allocated_gpus",
    "check_gpu",
    "device_count",
    "trainer_options",
    "wants_gpu",
]

log = logging.getLogger(__name__)

#: Default ``trainer.log_every_n_steps``.
DEFAULT_LOG_EVERY_N_STEPS: int = defaults("trainer", "log_every_n_steps")
_GPU_ACCELERATORS = ("gpu", "cuda")
# Variables that list allocated GPU ids (a value "0" is GPU number 0).
_GPU_ID_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
# Variables that count allocated GPUs (a value "0" is none).
_GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE")
_NO_DEVICE = ("", "-1", "none", "nodevfiles", "void")


def allocated_gpus(environ: Mapping[str, str] | None = None) -> str | None:
    """``NAME=value`` of the first variable saying GPUs were allocated to this job, or None."""
    environ = os.environ if environ is None else environ
    for name in _GPU_ID_VARS + _GPU_COUNT_VARS:
        value = str(environ.get(name, "")).strip()
        if value.lower() in _NO_DEVICE:
            continue
        if name in _GPU_COUNT_VARS:
            count = value.split(":")[-1].split("(")[0]  # "2", "a100:2", "2(x2)"
            if count.isdigit() and int(count) == 0:
                continue
        return f"{name}={value}"
    return None


def wants_gpu(accelerator: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this run should use a GPU (a short phrase), or None when it does not ask for one."""
    name = str(accelerator or "auto").lower()
    if name in _GPU_ACCELERATORS:
        return f"trainer.accelerator is {name!r}"
    if name == "auto":
        allocated = allocated_gpus(environ)
        if allocated:
            return f"{allocated} says GPUs were allocated (trainer.accelerator: auto)"
    return None


def check_gpu(accelerator: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Raise when the run asks for a GPU that torch cannot use; True when a GPU will be used.

    Raises:
        UserError: one line naming the request, torch's version and CUDA build, and
            ``torch.cuda.is_available()``.
    """
    why = wants_gpu(accelerator, environ)
    available = torch.cuda.is_available()
    if why is None:
        return str(accelerator or "auto").lower() == "auto" and available
    if available:
        return True
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise UserError(
        f"{why} but torch {torch.__version__} ({build}) cannot use it: "
        "torch.cuda.is_available() is False; install a torch whose CUDA version the node's "
        "driver supports (nvidia-smi shows it), or set trainer.accelerator: cpu"
    )


def device_count(devices: Any) -> int:
    """Processes per node that ``trainer.devices`` asks for (``auto``/-1: all visible GPUs)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices if devices is not None else 1).strip().lower()
    if text in ("auto", "-1"):
        return max(1, torch.cuda.device_count())
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return max(1, int(text))
    except ValueError:
        return 1


def _check_slurm_tasks(processes: int, environ: Mapping[str, str]) -> None:
    """Lightning under SLURM runs one process per task: N devices need N tasks on the node."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_NTASKS", "")
    tasks = per_node.split("(")[0].split(",")[0]
    if tasks.isdigit() and processes > 1 and int(tasks) != processes:
        raise UserError(
            f"trainer.devices asks for {processes} processes per node but this SLURM job runs "
            f"{tasks} task(s) per node: submit {processes} tasks (one per device), e.g. "
            f"sbatch --ntasks-per-node={processes}"
        )


def trainer_options(
    trainer: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``trainer:`` section completed for the device it will run on (see module doc).

    Raises:
        UserError: a GPU asked for and not usable (:func:`check_gpu`), or a SLURM job with fewer
            tasks than ``devices``.
    """
    environ = os.environ if environ is None else environ
    options = dict(trainer or {})
    on_gpu = check_gpu(options.get("accelerator", defaults("trainer", "accelerator")), environ)
    deterministic = options.get("deterministic")
    if deterministic is True:
        options["deterministic"] = "warn"
    elif deterministic == "strict":
        options["deterministic"] = True
    if on_gpu:
        options.setdefault("benchmark", not deterministic)
    processes = device_count(options.get("devices", defaults("trainer", "devices")))
    if on_gpu and processes * int(options.get("num_nodes", 1) or 1) > 1:
        options.setdefault("sync_batchnorm", True)
    _check_slurm_tasks(processes, environ)
    options.setdefault("log_every_n_steps", DEFAULT_LOG_EVERY_N_STEPS)
    return options
