# Train DINO on the scans that passed QC; resumes from model/work/checkpoints/last.ckpt.
# With trainer.devices: N > 1 inside a SLURM job (profiles/slurm), the N ranks are started here
# with srun, one per task of the job (nidl_dino.training.distributed).
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.model import training_scan_volumes
from nidl_dino.training.distributed import in_slurm_allocation, rank_paths, run_ranks
from nidl_dino.training.resources import n_devices
from nidl_dino.training.run import resume_checkpoint, train_from_config, training_fingerprint
from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import read_qc_table

with job(snakemake.log[0], "train") as log:
    qc = read_qc_table(snakemake.input.qc)
    volumes, scan_ids = training_scan_volumes(
        qc, Layout(**snakemake.params.layout), snakemake.params.train_scans
    )
    log.info(
        "training on %d of %d scans (the others were excluded by QC or by model.train_on)",
        len(volumes),
        len(qc),
    )
    config = snakemake.params.config
    work = Path(snakemake.params.work)
    n_tasks = n_devices(config.get("trainer"))
    if n_tasks > 1 and in_slurm_allocation():
        # stale checkpoints are moved aside once, here, before the ranks look at them
        resume_checkpoint(work / "checkpoints", training_fingerprint(config, volumes))
        log.info("starting %d training ranks with srun (output below, prefixed by rank)", n_tasks)
        spec = {
            "volume_paths": rank_paths(volumes),
            "config": config,
            "work_dir": str(work.resolve()),
            "teacher_path": str(Path(snakemake.output.teacher).resolve()),
            "scan_ids": scan_ids,
        }
        run_ranks(n_tasks, snakemake.threads, spec, work / "ranks_spec.json", log=log)
        summary = json.loads((work / "training_summary.json").read_text())
    else:
        summary = train_from_config(
            volumes,
            config,
            work_dir=work,
            teacher_path=snakemake.output.teacher,
            threads=snakemake.threads,
            memory_mb=snakemake.resources.get("mem_mb"),
            scan_ids=scan_ids,
        )
    for name, target in (("training_curves.png", "curves"), ("training_summary.json", "summary")):
        Path(snakemake.output[target]).write_bytes((work / name).read_bytes())
    log.info("trained: %s", summary)
