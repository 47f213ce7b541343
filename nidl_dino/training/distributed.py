"""Training on N tasks of one SLURM node: the job's resources, the ``srun`` launch, rank checks.

With ``trainer.devices: N`` (N > 1) the SLURM profile submits the ``train`` job with N tasks on
one node (:func:`nidl_dino.training.resources.train_job_resources`: the plugin turns
``tasks``/``nodes`` into ``--ntasks=N --nodes=1``, and ``gpu: N`` with ``tasks_per_gpu: 1``
into ``--gpus=N --ntasks-per-gpu=1``). The ``mpi`` resource keeps the plugin from wrapping the
job in ``srun -n1``; the job's script then starts the N ranks itself with ``srun``
(:func:`run_ranks`), and Lightning's ``SLURMEnvironment``
in each rank forms a world of N (DDP: gloo on CPUs, NCCL on GPUs). Each rank writes what it saw
and what it ended with (:class:`RankRecord`), so a run can show that the shards were disjoint and
the teachers identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback

from nidl_dino.errors import UserError

# moved to resources.py (no torch there); code that imported them from here keeps working
from nidl_dino.training.resources import n_devices, train_job_resources  # noqa: F401


def in_slurm_allocation() -> bool:
    """True inside a SLURM job (the jobstep keeps SLURM_JOB_ID for nested ``srun``)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and "SLURM_PROCID" not in os.environ


def run_ranks(
    n_tasks: int,
    cpus_per_task: int,
    spec: Mapping[str, Any],
    spec_path: str | os.PathLike,
    log: logging.Logger | None = None,
) -> None:
    """Start ``n_tasks`` training ranks on this job's node with ``srun``; wait for them.

    Args:
        n_tasks: ranks (one per device).
        cpus_per_task: CPUs (torch threads) of each rank.
        spec: keyword arguments of :func:`nidl_dino.training.run.train_from_config` (JSON-able).
        spec_path: where the spec is written for the ranks to read.
        log: the ranks' output lines (``srun --label``: each starts with its rank) go to this
            logger (the job's log file and stderr); None: this module's logger.

    Raises:
        UserError: ``srun`` is missing, or a rank failed (the log has its traceback).
    """
    log = log or logging.getLogger(__name__)
    Path(spec_path).write_text(json.dumps(dict(spec), indent=1))
    cmd = [
        "srun",
        # Lightning's SLURMEnvironment wants SLURM_NTASKS_PER_NODE (it refuses a bare --ntasks)
        "--nodes=1",
        f"--ntasks-per-node={n_tasks}",
        f"--cpus-per-task={cpus_per_task}",
        "--kill-on-bad-exit=1",
        "--label",
        sys.executable,
        "-m",
        "nidl_dino.training.run",  # its __main__ trains one rank from the spec
        str(spec_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(cpus_per_task), "PYTHONUNBUFFERED": "1"}
    # the checkout's package, whatever the ranks' working directory
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    except FileNotFoundError as err:
        raise UserError(
            "trainer.devices > 1 inside a SLURM job needs srun on PATH: run on a SLURM node, or "
            "set trainer.devices: 1"
        ) from err
    assert proc.stdout is not None
    for line in proc.stdout:
        log.info("rank %s", line.rstrip())
    if proc.wait() != 0:
        raise UserError(
            f"a training rank failed (srun exit status {proc.returncode}): see the rank lines "
            "of the train log"
        )


class RankRecord(Callback):
    """Writes ``<out_dir>/rank-<r>.json`` at the end of training: world size, the sample
    indices this rank drew in its first epoch, and a SHA-256 of its teacher and centre."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.first_epoch_indices: list[int] | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.first_epoch_indices is None:
            sampler = getattr(trainer.train_dataloader, "sampler", None)
            # the data module's sampler yields (epoch, index) keys
            keys = list(sampler) if sampler is not None else []
            self.first_epoch_indices = [int(k[1] if isinstance(k, tuple) else k) for k in keys]

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            if name.startswith(("teacher", "loss.center")):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": int(trainer.global_rank),
            "world_size": int(trainer.world_size),
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "first_epoch_indices": self.first_epoch_indices,
            "teacher_and_centre_sha256": digest.hexdigest(),
            "global_step": int(trainer.global_step),
        }
        (self.out_dir / f"rank-{record['rank']}.json").write_text(json.dumps(record) + "\n")


def rank_paths(volumes: Sequence[str]) -> list[str]:
    """Absolute paths, so that ranks started elsewhere find the volumes."""
    return [str(Path(v).resolve()) for v in volumes]
