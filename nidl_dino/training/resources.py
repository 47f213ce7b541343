"""The ``train`` job's scheduler resources, from the config alone.

Kept apart from :mod:`nidl_dino.training.distributed` so that the Snakefile (parsed again by
every cluster job) does not import torch and Lightning to size a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nidl_dino.settings import with_defaults


def n_devices(trainer_cfg: Mapping[str, Any] | None) -> int:
    """Processes the ``trainer`` section asks for: ``devices`` when it is an int, else 1."""
    devices = with_defaults(trainer_cfg, "trainer")["devices"]
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)  # as Lightning reads "2" (and as --config passes nested numbers)
    if isinstance(devices, bool) or not isinstance(devices, int):
        return 1  # "auto", a list of device ids: one process, Lightning decides on the node
    return max(1, devices)


def train_job_resources(config: Mapping[str, Any]) -> dict[str, Any]:
    """Scheduler resources of the ``train`` job (config.yaml ``resources.train`` + devices).

    One device: one task that sees ``gpu`` GPUs. N devices: N tasks on one node, one GPU each
    when ``gpu`` > 0 (``gpu`` becomes N).
    """
    res = dict(config["resources"]["train"])
    gpu = int(res.get("gpu", 0))
    out: dict[str, Any] = {
        "gpu": gpu,
        "mem_mb": res["mem_mb"],
        "runtime": res["runtime"],
        # one process sees the node's GPUs (the SLURM plugin < 2.7.1 otherwise adds
        # --ntasks-per-gpu=1); the CPUs per task are the rule's threads
        "tasks_per_gpu": 0,
    }
    n = n_devices(config.get("trainer"))
    if n > 1:
        out.update(
            gpu=n if gpu else 0,
            tasks_per_gpu=1 if gpu else 0,
            tasks=n,
            nodes=1,
            # the plugin runs an "mpi" job without `srun -n1`: run_ranks starts the N tasks
            mpi="srun",
        )
    return out
