"""Device views under 2-process CPU DDP (gloo): disjoint shards, views differ across ranks.

The datamodule with ``views_on_device`` (the GPU path, here on the CPU device) under Lightning's
DDP: each rank loads its own half of every epoch (Lightning wraps our epoch-seeded sampler in a
distributed one), seeds its views with its rank, and every rank ends with the same teacher and
centre. The worker is run as ``python worker.py OUT PATHS...``; Lightning re-runs it for rank 1.

Then the workflow's entry point, ``train_from_config``, under the same DDP and as two SLURM tasks
(the variables ``srun -n2`` sets, by hand: the real single-node Slurm test lives with the SLURM
profile): a world of 2, and only rank 0 writes the outputs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dino_fixtures import gloo_env, noise_volumes

N_VOLUMES, BATCH, EPOCHS, WORLD = 8, 2, 2, 2

WORKER = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path

    import torch
    from pytorch_lightning.callbacks import Callback

    from dino_fixtures import QUIET_TRAINER
    from nidl_dino import DINO
    from nidl_dino.training.data import DINODataModule
    from nidl_dino.encoders.networks import build_encoder

    torch.set_num_threads(1)
    out, paths = Path(sys.argv[1]), sys.argv[2:]


    class Keyed(DINODataModule):
        # records the sample indices and seed of each training batch, before the transfer
        def on_before_batch_transfer(self, batch, dataloader_idx):
            moved = super().on_before_batch_transfer(batch, dataloader_idx)
            self.keys.append((int(batch[1][0]), batch[2].tolist(), moved.seed))
            return moved


    class Views(Callback):
        def __init__(self):
            self.views = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.views.append([v.clone() for v in batch])


    views = {{
        "global_size": 12, "local_size": 6, "num_local_crops": 2,
        "global_scale": [0.5, 1.0], "local_scale": [0.05, 0.2],
    }}
    dm = Keyed(paths, views, batch_size={BATCH}, views_on_device=True, seed=0)
    dm.keys = []
    recorder = Views()
    encoder = build_encoder(
        {{"name": "small_cnn", "kwargs": {{"channels": [4, 8]}}}}, image_size=dm.image_sizes
    )
    model = DINO(
        encoder, proj_input_dim=encoder.output_dim, proj_hidden_dim=16, proj_bottleneck_dim=8,
        proj_output_dim=32, num_local_crops=2, random_state=0, devices={WORLD},
        strategy="ddp", max_epochs={EPOCHS}, callbacks=[recorder], default_root_dir=str(out),
        **QUIET_TRAINER,
    )
    model.fit(None, datamodule=dm)
    torch.save(
        {{
            "rank": model.global_rank,
            "keys": dm.keys,
            "views": recorder.views,
            "teacher": model.teacher.state_dict(),
            "center": model.loss.center.clone(),
        }},
        out / f"rank{{model.global_rank}}.pt",
    )
    """
)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


TRAIN_WORKER = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import torch

    from nidl_dino.training.run import train_from_config

    torch.set_num_threads(1)
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    config = {
        "encoder": {"name": "small_cnn", "kwargs": {"channels": [4, 8]}},
        "views": {"global_size": 12, "local_size": 6, "num_local_crops": 2},
        "data": {"batch_size": 2, "num_workers": 0, "cache": "memory", "views_on_device": True},
        "dino": {"proj_hidden_dim": 16, "proj_bottleneck_dim": 8, "proj_output_dim": 32},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 1,
                    "enable_progress_bar": False},
        "seed": 0,
    }
    summary = train_from_config(paths, config, out / "work", out / "teacher.pt")
    rank = os.environ.get("LOCAL_RANK", "0")
    (out / f"summary{rank}.json").write_text(json.dumps(summary))
    """
)


def write_volumes(folder: Path) -> list[str]:
    return noise_volumes(folder, N_VOLUMES, 14, name="sub-{i:02d}_T1w.nii")


def run_worker(folder: Path, source: str) -> None:
    """One command; Lightning's launcher starts the second process."""
    paths = write_volumes(folder)
    script = folder / "worker.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), *paths],
        cwd=folder,
        env=gloo_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp_views")
    run_worker(folder, WORKER)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    return results


def test_each_epoch_is_split_into_disjoint_halves(ranks):
    per_rank = N_VOLUMES // WORLD // BATCH
    for epoch in range(EPOCHS):
        seen = []
        for r in ranks:
            keys = [k for k in r["keys"] if k[0] == epoch]
            assert len(keys) == per_rank
            seen.append([i for _, indices, _ in keys for i in indices])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(N_VOLUMES))


def test_ranks_draw_different_views_and_seeds(ranks):
    first, second = ranks
    assert len(first["views"]) == len(second["views"]) == EPOCHS * N_VOLUMES // WORLD // BATCH
    assert {k[2] for k in first["keys"]}.isdisjoint({k[2] for k in second["keys"]})
    for a, b in zip(first["views"], second["views"], strict=True):
        assert all(not torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_teacher_and_centre_identical_on_both_ranks(ranks):
    first, second = ranks
    for key, value in first["teacher"].items():
        assert torch.allclose(value.double(), second["teacher"][key].double(), atol=1e-6), key
    assert torch.allclose(first["center"], second["center"], atol=1e-6)


def test_train_from_config_under_ddp_writes_the_outputs_once(tmp_path):
    import json

    run_worker(tmp_path, TRAIN_WORKER)
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(WORLD)]
    assert "model_id" in summaries[0] and "model_id" not in summaries[1]  # rank 0 writes
    assert summaries[0]["global_step"] == summaries[1]["global_step"] == N_VOLUMES // WORLD // BATCH
    assert (tmp_path / "teacher.pt").is_file()
    assert (tmp_path / "work" / "training_summary.json").is_file()
    assert (tmp_path / "work" / "checkpoints" / "last.ckpt").is_file()


def test_train_from_config_as_two_slurm_tasks(tmp_path):
    # What srun -n2 sets for two tasks on one node (by hand: no Slurm here); Lightning's SLURM
    # environment makes one process per task, ranks from SLURM_PROCID.
    import json

    paths = write_volumes(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(TRAIN_WORKER.replace("LOCAL_RANK", "SLURM_PROCID"))
    env = gloo_env()
    env.update(
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NAME="train",
        SLURM_NODELIST="localhost",
        SLURM_JOB_ID="4242",
    )
    tasks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), *paths],
            cwd=tmp_path,
            env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(WORLD)
    ]
    errors = [task.communicate(timeout=240)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(WORLD)]
    # a world of 2: each task ran half of the epoch's batches, and only rank 0 wrote the teacher
    assert summaries[0]["global_step"] == summaries[1]["global_step"] == N_VOLUMES // WORLD // BATCH
    assert "model_id" in summaries[0] and "model_id" not in summaries[1]
    assert (tmp_path / "teacher.pt").is_file()


def test_ranks_agree_on_the_checkpoint_to_resume(tmp_path):
    from nidl_dino.training.run import _resume_checkpoint_read_only, resume_checkpoint

    ckpt = tmp_path / "checkpoints"
    assert resume_checkpoint(ckpt, "aaa") is None  # rank 0, fresh: creates the marker
    assert _resume_checkpoint_read_only(ckpt, "aaa") is None  # other ranks: same answer
    (ckpt / "last.ckpt").write_text("x")
    assert resume_checkpoint(ckpt, "aaa") == str(ckpt / "last.ckpt")
    assert _resume_checkpoint_read_only(ckpt, "aaa") == str(ckpt / "last.ckpt")
    assert _resume_checkpoint_read_only(ckpt, "bbb") is None  # never moves anything
    assert (ckpt / "last.ckpt").exists()
    assert resume_checkpoint(ckpt, "bbb") is None  # rank 0 moves the other run aside
    assert not (ckpt / "last.ckpt").exists()
    assert len(list(tmp_path.glob("checkpoints.stale-*"))) == 1
    assert _resume_checkpoint_read_only(ckpt, "bbb") is None
