"""Workflow tests that need no real data: DAG, lint, formatting, profiles, schema, envs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_helpers import REPO, dry_run, snakemake, tiny_bids


def _jobs(stdout: str) -> dict[str, int]:
    """Jobs per rule of a dry run; ``preprocess``: the jobs of every batch's rule together."""
    table = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", stdout, re.S)
    assert table, stdout
    jobs: dict[str, int] = {}
    for name, n in (line.split() for line in table.group(1).splitlines()):
        key = "preprocess" if name.startswith("preprocess_batch_") else name
        jobs[key] = jobs.get(key, 0) + int(n)
    return jobs


@pytest.fixture
def bids(tmp_path):
    return tiny_bids(tmp_path / "bids", subjects=("01", "02", "03"))


def test_dry_run_dag_without_sessions(tmp_path, bids):
    res = dry_run(tmp_path, bids)
    assert res.returncode == 0, res.stderr
    jobs = _jobs(res.stdout)
    assert jobs == {
        "preprocess": 1,  # one batch of 3 scans
        "qc_table": 1,
        "train": 1,
        "extract": 1,
        "cohort": 1,
        "probe": 1,
        "model_card": 1,
        "report": 1,
        "dataset_description": 1,
        "all": 1,
    }
    assert "out/preproc/batches/batch-0001.tsv" in res.stdout
    assert "sub-02_T1w.nii.gz" in res.stdout
    assert not (REPO / "out").exists()
    # one scan per job
    res = dry_run(
        tmp_path,
        bids,
        "resources={'preprocess': {'scans_per_job': 2}}",
    )
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["preprocess"] == 2


def test_dry_run_dag_with_sessions(tmp_path):
    bids = tiny_bids(tmp_path / "bids", subjects=("01", "02"), sessions=("1", "2"))
    one_per_job = "resources={'preprocess': {'scans_per_job': 1}}"
    res = dry_run(
        tmp_path,
        bids,
        one_per_job,
    )
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["preprocess"] == 4
    assert "sub-02_ses-2_T1w.nii.gz" in res.stdout
    # a session filter from the command line
    res = dry_run(
        tmp_path,
        bids,
        "inputs={'sessions': ['2']}",
        one_per_job,
    )
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["preprocess"] == 2


def test_lint_is_clean(tmp_path, bids):
    res = snakemake(tmp_path, "--lint", "--config", f"bids_dir={bids}", "output_dir=out")
    assert res.returncode == 0, res.stderr
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr


def test_snakefmt_check():
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "pipeline/rules").glob("*.smk")))]
    res = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        (["trainer={'max_epochs': 'ten'}"], "config key 'trainer.max_epochs' = 'ten' is invalid"),
        (["dino={'learnin_rate': 0.1}"], "unknown key 'dino.learnin_rate'"),
        (["data={'cache': 'ram'}"], "config key 'data.cache' = 'ram' is invalid"),
        (["bids_dir=/nonexistent/bids"], "bids_dir '/nonexistent/bids' does not exist"),
    ],
)
def test_config_errors_are_one_line_before_any_job(tmp_path, bids, override, expected):
    res = dry_run(tmp_path, bids, *override)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("nidl-dino: error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_no_t1w_found_is_one_line(tmp_path):
    empty = tmp_path / "empty_bids"
    (empty / "sub-01" / "anat").mkdir(parents=True)
    res = snakemake(tmp_path, "-n", "--cores", "1", "--config", f"bids_dir={empty}", "output_dir=o")
    assert res.returncode == 2
    assert "nidl-dino: error:" in res.stderr and "T1w" in res.stderr
    assert "Traceback" not in res.stderr


def test_user_configfile_overlay(tmp_path, bids):
    overlay = tmp_path / "my_study.yaml"
    overlay.write_text(
        yaml.safe_dump({"bids_dir": str(bids), "output_dir": "study", "trainer": {"max_epochs": 2}})
    )
    res = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(overlay))
    assert res.returncode == 0, res.stderr
    assert "study/preproc/batches/batch-0001.tsv" in res.stdout


def _profile(name: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / name / "config.v8+.yaml").read_text())


def test_profiles_name_valid_options():
    from snakemake.cli import get_argument_parser

    parser = get_argument_parser()
    known = {opt.lstrip("-") for action in parser._actions for opt in action.option_strings}
    # the SLURM plugin's own options (slurm-status-command, ...) when it is installed
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    known |= {"slurm-" + f.replace("_", "-") for f in plugin.ExecutorSettings.__dataclass_fields__}
    for name in ("local", "slurm"):
        for key in _profile(name):
            assert key in known, f"profiles/{name}: unknown option {key}"
    slurm = _profile("slurm")
    assert slurm["executor"] == "slurm"
    assert slurm["slurm-status-command"] == "squeue"  # sacct hangs without slurmdbd / on scancel
    # Only what differs between clusters: partitions and account. Sizes come from config.yaml's
    # resources through the rules, so a command-line override of the profile's block loses none.
    assert set(slurm["default-resources"]) <= {"slurm_partition", "slurm_account", "runtime"}
    assert set(slurm["set-resources"]) == {"train", "extract"}
    for rule, resources in slurm["set-resources"].items():
        assert set(resources) <= {"slurm_partition", "slurm_account"}, rule
    assert "set-threads" not in slurm


def _resources_of(rule: str, stdout: str) -> dict:
    """Resources of ``rule``'s job in a ``snakemake -n -p`` listing ("resources: a=1, b=x")."""
    block = stdout[stdout.index(f"rule {rule}:") :]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    pairs = (item.split("=", 1) for item in line.split(":", 1)[1].split(", "))
    return {k.strip(): v.strip() for k, v in pairs}


def _slurm_dry_run(tmp_path, bids, *config, extra=()):
    """``snakemake -n`` through the shipped SLURM profile (conda is an option the user adds)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    return snakemake(
        tmp_path,
        "-n",
        "--profile",
        str(REPO / "profiles/slurm"),
        *extra,
        "--config",
        f"bids_dir={bids}",
        "output_dir=o",
        *config,
    )


def test_slurm_profile_dry_run_through_the_plugin(tmp_path, bids):
    res = _slurm_dry_run(tmp_path, bids)
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["train"] == 1
    train = _resources_of("train", res.stdout)
    assert train["slurm_partition"] == "gpu" and train["gpu"] == "1"
    assert train["mem_mb"] == "16000" and train["tasks_per_gpu"] == "0"


def test_slurm_profile_overrides_keep_the_other_resources(tmp_path, bids):
    """One size changed with --config, the partitions with the documented flags: nothing lost."""
    res = _slurm_dry_run(
        tmp_path,
        bids,
        'resources={"train": {"mem_mb": 3000}}',
        "--default-resources",
        "slurm_partition=debug",
        "--set-resources",
        "train:slurm_partition=gpu2",
        "extract:slurm_partition=gpu2",
    )
    assert res.returncode == 0, res.stderr
    train = _resources_of("train", res.stdout)
    assert train["mem_mb"] == "3000" and train["gpu"] == "1" and train["runtime"] == "720"
    assert train["slurm_partition"] == "gpu2"
    assert _resources_of("extract", res.stdout)["mem_mb"] == "8000"
    assert _resources_of("preprocess_batch_0001", res.stdout)["slurm_partition"] == "debug"


def test_gpu_recipe_overlay_dry_runs_through_the_slurm_profile(tmp_path, bids):
    """profiles/gpu_recipe.yaml is a valid overlay (schema-checked) whose sizes reach the jobs."""
    recipe = yaml.safe_load((REPO / "profiles/gpu_recipe.yaml").read_text())
    res = _slurm_dry_run(
        tmp_path, bids, extra=("--configfile", str(REPO / "profiles/gpu_recipe.yaml"))
    )
    assert res.returncode == 0, res.stderr
    train = _resources_of("train", res.stdout)
    assert train["mem_mb"] == str(recipe["resources"]["train"]["mem_mb"]) and train["gpu"] == "1"
    extract = _resources_of("extract", res.stdout)
    assert extract["mem_mb"] == str(recipe["resources"]["extract"]["mem_mb"])


def test_local_profile_dry_runs_without_conda(tmp_path, bids):
    env_path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "conda").exists()
    )
    res = snakemake(
        tmp_path,
        "-n",
        "--profile",
        str(REPO / "profiles/local"),
        "--config",
        f"bids_dir={bids}",
        "output_dir=o",
        env={"PATH": env_path},
    )
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["train"] == 1
    assert "conda" not in res.stderr.lower()


def test_use_conda_dry_run_lists_envs(tmp_path, bids):
    if shutil.which("conda") is None:
        pytest.skip("conda is not installed here; env files are checked above")
    res = snakemake(tmp_path, "-n", "--use-conda", "--cores", "1", "--config", f"bids_dir={bids}")
    assert res.returncode == 0, res.stderr


def test_the_demo_cohort_is_made_by_a_job_and_a_dry_run_writes_nothing(tmp_path):
    # config.yaml as shipped, from a fresh folder: the DAG is planned on the demo's scans
    demo = "demo={'n_subjects': 5}"
    res = snakemake(tmp_path, "-n", "--cores", "1", "--config", demo)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = _jobs(res.stdout)
    assert jobs["demo_data"] == 1 and jobs["preprocess"] == 1
    assert res.stdout.count("_T1w.nii.gz") >= 5  # the planned scans are the batch's inputs
    written = [p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / ".snakemake")]
    assert written == [], written  # nothing but Snakemake's own folder

    # the demo, and a job that reads it (the derivatives' SourceDatasets)
    made = snakemake(tmp_path, "dataset_description", "--cores", "1", "--config", demo)
    assert made.returncode == 0, made.stderr[-2000:]
    bids = tmp_path / "demo_data/bids"
    assert len(list(bids.glob("sub-*/anat/*_T1w.nii.gz"))) == 5
    assert (bids / "participants.tsv").is_file()
    again = snakemake(tmp_path, "-n", "--cores", "1", "--config", demo)
    assert again.returncode == 0, again.stderr[-2000:]
    jobs = _jobs(again.stdout)
    assert "demo_data" not in jobs and jobs["preprocess"] == 1
    assert "dataset_description" not in jobs  # its input is the same file as before


def test_nested_command_line_values_get_the_schema_types(tmp_path, bids):
    # snakemake reads nested --config values as strings; the workflow converts them by schema
    res = dry_run(
        tmp_path,
        bids,
        "trainer={'max_epochs': 3, 'gradient_clip_val': 1.5}",
        "views={'global_size': [32, 32, 32], 'num_local_crops': 4}",
        "data={'pin_memory': null}",
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_coerce_to_schema_by_hand():
    from nidl_dino.workflow.setup import coerce_to_schema

    schema = {
        "type": "object",
        "$defs": {
            "size": {
                "oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]
            }
        },
        "properties": {
            "n": {"type": "integer"},
            "name": {"type": "string"},
            "size": {"$ref": "#/$defs/size"},
            "flag": {"type": ["boolean", "null"]},
            "free": {"type": "object"},
        },
    }
    config = {
        "n": "5",
        "name": "007",
        "size": ["2", "3"],
        "flag": "null",
        "free": {"a": "1.5", "b": "x"},
    }
    coerce_to_schema(config, schema, schema)
    assert config == {
        "n": 5,
        "name": "007",
        "size": [2, 3],
        "flag": None,
        "free": {"a": 1.5, "b": "x"},
    }


def test_cluster_jobs_read_the_cached_scan_list_instead_of_the_tree(tmp_path):
    import shutil as _shutil

    from nidl_dino.workflow.setup import discover, scan_cache_path, write_scan_cache

    bids = tiny_bids(tmp_path / "bids", subjects=("01", "02", "03"))
    config = {"bids_dir": str(bids), "output_dir": str(tmp_path / "out"), "inputs": {}}
    scans = discover(config)
    assert not scan_cache_path(config).exists()  # discovering writes nothing
    write_scan_cache(config, scans)
    cached = scan_cache_path(config)
    mtime = cached.stat().st_mtime_ns
    write_scan_cache(config, scans)  # unchanged: not rewritten
    assert cached.stat().st_mtime_ns == mtime
    _shutil.rmtree(bids / "sub-03")
    assert list(discover(config, reuse_cache=True)["scan_id"]) == ["sub-01", "sub-02", "sub-03"]
    assert list(discover(config)["scan_id"]) == ["sub-01", "sub-02"]
    # another selection of scans has its own cache
    other = {**config, "inputs": {"exclude_subjects": ["01"]}}
    assert scan_cache_path(other) != cached


def test_a_dry_run_writes_nothing_a_run_writes_the_scan_cache(tmp_path, bids):
    res = dry_run(tmp_path, bids)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists()
    # a real run of one cheap target: onstart caches the list for the cluster jobs
    res = snakemake(
        tmp_path,
        "out/preproc/batches/batch-0001.tsv",
        "--cores",
        "1",
        "--config",
        f"bids_dir={bids}",
        "output_dir=out",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cached = list((tmp_path / "out/.cache").glob("scans-*.tsv"))
    assert len(cached) == 1
    assert "sub-03" in cached[0].read_text()


def _teacher_for(path: Path, preprocessing: dict) -> Path:
    """A small teacher whose card records ``preprocessing`` (no training needed)."""
    from nidl_dino.encoders.networks import build_encoder
    from nidl_dino.features.teacher import save_teacher
    from nidl_dino.model import training_card

    spec = {"name": "small_cnn", "kwargs": {"channels": [4, 8]}}
    card = training_card({"preprocessing": preprocessing}, ["sub-01"], {})
    save_teacher(build_encoder(spec), spec, path, extra={"card": card})
    return path


def test_a_given_teacher_replaces_the_train_job(tmp_path, bids):
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())["preprocessing"]
    teacher = _teacher_for(tmp_path / "elsewhere" / "teacher.pt", shipped)
    res = dry_run(tmp_path, bids, f"model={{'teacher': '{teacher}'}}")
    assert res.returncode == 0, res.stderr
    jobs = _jobs(res.stdout)
    assert "train" not in jobs and jobs["extract"] == 1 and jobs["model_card"] == 1
    assert str(teacher) in res.stdout  # extract reads the given file

    # another grid: refused before any job, one line naming both values
    res = dry_run(
        tmp_path,
        bids,
        f"model={{'teacher': '{teacher}'}}",
        "preprocessing={'resample': {'spacing_mm': 5.0}}",
    )
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("nidl-dino: error")]
    assert len(errors) == 1 and "spacing_mm" in errors[0] and "5.0" in errors[0]
    # a damaged file: refused in one line
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(teacher.read_bytes()[:1000])
    res = dry_run(tmp_path, bids, f"model={{'teacher': '{damaged}'}}")
    errors = [x for x in res.stderr.splitlines() if x.startswith("nidl-dino: error")]
    assert res.returncode == 2 and len(errors) == 1 and "damaged" in errors[0]


def test_train_on_selecting_no_scan_stops_before_any_job(tmp_path, bids):
    res = dry_run(tmp_path, bids, "model={'train_on': {'sex': ['X']}}")
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("nidl-dino: error")]
    assert len(errors) == 1 and "model.train_on selects no scan" in errors[0]
    res = dry_run(tmp_path, bids, "model={'train_on': ['01', 'sub-02']}")
    assert res.returncode == 0, res.stderr
    assert _jobs(res.stdout)["train"] == 1


class _Resources(dict):
    """What the SLURM plugin reads from a job: ``resources.get(k)`` and ``resources.k``."""

    __getattr__ = dict.__getitem__


@pytest.mark.parametrize(
    ("devices", "gpu", "expected"),
    [
        (1, 1, ["--gpus=1", "--cpus-per-task=8"]),  # one task that sees the GPU
        (2, 1, ["--gpus=2", "--ntasks-per-gpu=1", "--ntasks=2", "--nodes=1"]),
        (2, 0, ["--ntasks=2", "--nodes=1", "--cpus-per-task=8"]),
    ],
)
def test_train_job_submits_one_task_per_device(devices, gpu, expected):
    """trainer.devices: N -> the plugin's own sbatch line asks for N tasks on one node."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    from nidl_dino.training.resources import train_job_resources

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["trainer"]["devices"] = devices
    config["resources"]["train"]["gpu"] = gpu
    job = type("Job", (), {})()
    job.resources = _Resources(train_job_resources(config), slurm_partition="gpu")
    job.threads = config["resources"]["train"]["threads"]
    params = {
        "run_uuid": "u",
        "slurm_logfile": "l",
        "comment_str": "rule_train",
        "account": "",
        "partition": "-p gpu",
        "workdir": ".",
    }
    call = get_submit_command(job, params) + set_gres_string(job)
    args = call.split()
    for flag in expected:
        assert flag in args, call
    if devices == 1:
        assert not any(a.startswith(("--ntasks", "--nodes")) for a in args), call
    if not gpu:
        assert not any(a.startswith("--gpus") for a in args), call


def test_cohort_wide_rules_ask_for_resources_that_grow_with_the_cohort(tmp_path):
    from nidl_dino.workflow.setup import AGGREGATE_RESOURCES, aggregate_resources

    for rule, formulas in AGGREGATE_RESOURCES.items():
        small, large = aggregate_resources(rule, 100), aggregate_resources(rule, 10_000)
        for key, (base, per_scan) in formulas.items():
            assert large[key] == round(base + per_scan * 10_000), (rule, key)
            assert large[key] >= small[key]
    assert aggregate_resources("cohort", 10_000)["mem_mb"] >= 1024  # cohort: 207 MiB measured
    assert (
        aggregate_resources("probe", 10_000)["mem_mb"] > aggregate_resources("probe", 100)["mem_mb"]
    )
    # and the rules declare them: the dry run prints each job's resources
    bids = tiny_bids(tmp_path / "bids", subjects=("01", "02", "03"))
    res = snakemake(tmp_path, "-n", "--cores", "1", "--config", f"bids_dir={bids}", "output_dir=o")
    assert res.returncode == 0, res.stderr
    for rule in ("qc_table", "cohort", "probe", "report"):
        expected = aggregate_resources(rule, 3)["mem_mb"]
        block = res.stdout.split(f"rule {rule}:")[1].split("\n\n")[0]
        assert f"mem_mb={expected}" in block, (rule, block)


def test_parsing_the_snakefile_imports_neither_torch_nor_lightning():
    """Every cluster job parses the Snakefile again: its imports stay light (torch takes seconds)."""
    pattern = re.compile(
        r"^(?:from nidl_dino\S* import (?:\([^)]*\)|.*)|import nidl_dino.*)$", re.M
    )
    imports = [
        statement
        for path in [REPO / "Snakefile", *sorted((REPO / "pipeline/rules").glob("*.smk"))]
        for statement in pattern.findall(path.read_text())
    ]
    assert len(imports) >= 5
    heavy = ("torch", "pytorch_lightning", "lightning", "monai", "ants", "sklearn")
    code = "\n".join(
        [
            f"import sys; sys.path.insert(0, {str(REPO)!r})",
            *imports,
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))",
        ]
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", imports
