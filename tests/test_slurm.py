"""The demo through profiles/slurm on a real one-node Slurm cluster (.ci/slurm-cluster.sh).

Slow and root-only: ``bash .ci/slurm-cluster.sh && python -m pytest -m slow tests/test_slurm.py``.
Two runs go side by side: one whose training job is ``scancel``-ed once it has written a
checkpoint (the profile's ``retries: 1`` resubmits it and it resumes), one left alone; both must
end with the same teacher. Only the overrides the README documents are used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workflow_helpers import REPO, SNAKEFILE

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = REPO / ".ci" / "slurm-cluster.sh"
TIMEOUT_S = 1500  # the plugin can wait silently forever: every run is bounded
MAX_EPOCHS = 40

# Documented --config overrides: a small demo, short training on the CPU, sizes for a 2-CPU node.
CONFIG = [
    "output_dir=out",
    'demo={"n_subjects": 8, "n_bad": 1}',
    'preprocessing={"resample": {"spacing_mm": 6.0}}',
    'views={"global_size": [16, 16, 16], "local_size": [8, 8, 8], "num_local_crops": 2}',
    'data={"batch_size": 2, "num_workers": 0}',
    'dino={"proj_hidden_dim": 32, "proj_bottleneck_dim": 16, "proj_output_dim": 64}',
    f'trainer={{"max_epochs": {MAX_EPOCHS}, "accelerator": "cpu"}}',
    'probes={"n_splits": 2, "n_repeats": 1, "inner_splits": 2, "pca": {"n_components": 1}}',
    'resources={"preprocess": {"mem_mb": 1000, "threads": 2}, "train": {"mem_mb": 2000, "threads": 1},'
    ' "extract": {"mem_mb": 2000, "threads": 1}}',
]
# Documented profile overrides: this cluster's CPU partition is "debug" (its GPU one is "gpu", as
# in the profile); a first status check after 5 s instead of 40 s keeps the test short.
PROFILE_ARGS = [
    "--default-resources",
    "slurm_partition=debug",
    "--slurm-init-seconds-before-status-checks",
    "5",
]


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the Slurm test needs root on Linux (it installs and starts a cluster)"
    if not shutil.which("apt-get") and not shutil.which("sbatch"):
        return "the Slurm test needs apt-get (Debian/Ubuntu) or an installed Slurm"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "the Slurm test needs snakemake-executor-plugin-slurm"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    res = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"{CLUSTER_SCRIPT.name} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout


def _start(workdir: Path, config: list[str] = CONFIG) -> subprocess.Popen:
    workdir.mkdir(parents=True)
    # sbatch jobs inherit this PATH (--export=ALL): they run this interpreter's snakemake
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE)]
    cmd += ["--profile", str(REPO / "profiles/slurm"), *PROFILE_ARGS, "--config", *config]
    log = open(workdir / "snakemake.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _jobs(workdir: Path) -> list[dict]:
    """This run's Slurm jobs from the accounting database (sacct), oldest first."""
    out = subprocess.run(
        [
            "sacct",
            "-X",
            "-n",
            "-P",
            "-S",
            "now-1days",
            "-o",
            "JobID,Comment,State,WorkDir,AllocTRES",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keys = ("id", "comment", "state", "workdir", "tres")
    rows = [dict(zip(keys, line.split("|"), strict=False)) for line in out.splitlines() if line]
    return [r for r in rows if Path(r["workdir"]) == workdir]


def _queued(workdir: Path, rule: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%k|%Z"], capture_output=True, text=True, check=True
    ).stdout
    ids = []
    for line in out.splitlines():
        job_id, comment, wd = line.split("|")
        if Path(wd) == workdir and comment == f"rule_{rule}":
            ids.append(job_id)
    return ids


def _stop(proc: subprocess.Popen, workdir: Path) -> None:
    """Timeout: stop Snakemake and this run's jobs, then fail with the log's tail."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    ids = [r["id"] for r in _jobs(workdir) if r["state"] in ("PENDING", "RUNNING")]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def _tail(workdir: Path) -> str:
    return (workdir / "snakemake.log").read_text()[-3000:]


def _final_state(workdir: Path) -> dict:
    ckpt = torch.load(workdir / "out/model/work/checkpoints/last.ckpt", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("teacher", "loss.center"))}


def test_demo_through_slurm_with_cancel_and_resume(cluster, tmp_path):
    t0 = time.time()
    cancelled, straight = tmp_path / "cancelled", tmp_path / "straight"
    runs = {cancelled: _start(cancelled), straight: _start(straight)}
    deadline = t0 + TIMEOUT_S

    # scancel the training job as soon as it has written a checkpoint
    ckpt = cancelled / "out/model/work/checkpoints/last.ckpt"
    while not ckpt.exists() and time.time() < deadline and runs[cancelled].poll() is None:
        time.sleep(0.5)
    assert ckpt.exists(), "no checkpoint before the deadline"
    train_ids = _queued(cancelled, "train")
    assert len(train_ids) == 1, train_ids
    subprocess.run(["scancel", train_ids[0]], check=True)
    cancelled_at = time.time() - t0
    assert not (cancelled / "out/model/teacher.pt").exists()

    for workdir, proc in runs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _stop(proc, workdir)
            tail = (workdir / "snakemake.log").read_text()[-2000:]
            pytest.fail(f"{workdir.name}: Snakemake did not finish in {TIMEOUT_S} s:\n{tail}")
        log = (workdir / "snakemake.log").read_text()
        assert proc.returncode == 0, log[-3000:]
    wall = time.time() - t0

    # every job went through sbatch and finished; the cancelled one was resubmitted once
    for workdir in runs:
        log = (workdir / "snakemake.log").read_text()
        steps = [ln for ln in log.splitlines() if "steps (100%) done" in ln]
        n_steps = int(steps[-1].split(" of ")[1].split()[0])
        jobs = _jobs(workdir)
        done = [j for j in jobs if j["state"] == "COMPLETED"]
        # every step is one sbatch job but the local rules: `all` (nothing to run) and those
        # the workflow declares in `localrules` (the log also holds the cancelled job's own
        # output, where its step ran as a "localrule" inside its sbatch job)
        local_rules = ("all", "dataset_description", "demo_data")
        assert all(f"\nlocalrule {rule}:" in log for rule in local_rules)
        assert len(done) == n_steps - len(local_rules), (n_steps, jobs)
        assert all(j["comment"].startswith("rule_") for j in jobs)
        train = [j for j in jobs if j["comment"] == "rule_train"]
        expected = ["CANCELLED", "COMPLETED"] if workdir == cancelled else ["COMPLETED"]
        assert [j["state"].split()[0] for j in train] == expected, train
        # the profile's GPU request reaches Slurm (--gpus=1), threads become the CPUs per task
        assert "gres/gpu=1" in train[-1]["tres"] and "cpu=1" in train[-1]["tres"], train
        assert (workdir / "out/report/report.html").exists()

    # the resubmitted job resumed from the checkpoint and ended where the uninterrupted run did
    assert "resuming training from" in (cancelled / "out/logs/train.log").read_text()
    summaries = {w: json.loads((w / "out/model/training_summary.json").read_text()) for w in runs}
    assert str(summaries[cancelled]["resumed_from"]).endswith("last.ckpt")
    assert summaries[straight]["resumed_from"] in (None, "")
    # (not the fingerprint: it holds each volume's preprocessing signature, and each run
    # generated its own copy of the demo scans, with other modification times)
    for key in ("model_id", "global_step", "epochs", "final_loss"):
        assert summaries[cancelled][key] == summaries[straight][key], key
    resumed, uninterrupted = _final_state(cancelled), _final_state(straight)
    assert resumed.keys() == uninterrupted.keys() and "loss.center" in resumed
    for key, value in resumed.items():
        assert torch.equal(value, uninterrupted[key]), key
    print(f"\nslurm demo: cancelled at {cancelled_at:.0f} s, both runs done in {wall:.0f} s")


def test_two_devices_train_as_two_slurm_tasks_in_one_world(cluster, tmp_path):
    """trainer.devices: 2 on the SLURM profile: one job of 2 tasks, srun starts 2 ranks, gloo
    world of 2 (CPU), disjoint shards, identical teachers and centres."""
    workdir = tmp_path / "ddp"
    overrides = [
        'trainer={"max_epochs": 3, "accelerator": "cpu", "strategy": "ddp", "devices": 2}',
        'demo={"n_subjects": 6, "n_bad": 1}',
        'resources={"preprocess": {"mem_mb": 1000}, "train": {"gpu": 0, "mem_mb": 2000,'
        ' "threads": 1}}',
    ]
    proc = _start(workdir, CONFIG + overrides + ["--until", "train"])
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        _stop(proc, workdir)
        pytest.fail(f"Snakemake did not finish in 900 s:\n{_tail(workdir)}")
    assert proc.returncode == 0, _tail(workdir)

    train = [j for j in _jobs(workdir) if j["comment"] == "rule_train"]
    assert len(train) == 1 and train[0]["state"] == "COMPLETED", train
    assert "cpu=2" in train[0]["tres"], train  # 2 tasks x 1 CPU
    steps = subprocess.run(
        ["sacct", "-j", train[0]["id"], "-n", "-P", "-o", "JobID,NTasks,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(s.split("|")[1] == "2" and s.split("|")[2] == "COMPLETED" for s in steps), steps

    records = [
        json.loads(p.read_text())
        for p in sorted((workdir / "out/model/work/ranks").glob("rank-*.json"))
    ]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    assert all(r["cluster_environment"] == "SLURMEnvironment" for r in records)
    # disjoint shards, up to DistributedSampler's padding (it repeats indices so that every
    # rank gets ceil(n / 2) samples): together they cover the n training scans once
    n = json.loads((workdir / "out/model/training_summary.json").read_text())["n_train_volumes"]
    shards = [r["first_epoch_indices"] for r in records]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2), shards
    assert set(shards[0]) | set(shards[1]) == set(range(n)), shards
    assert len(set(shards[0]) & set(shards[1])) == 2 * -(-n // 2) - n, shards
    assert records[0]["teacher_and_centre_sha256"] == records[1]["teacher_and_centre_sha256"]
    assert records[0]["global_step"] == records[1]["global_step"] > 0
    log = (workdir / "out/logs/train.log").read_text()
    assert "rank 0:" in log and "rank 1:" in log
    assert (workdir / "out/model/teacher.pt").exists()
