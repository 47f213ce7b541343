# Train DINO on the scans that passed QC; resumes from model/work/checkpoints/last.ckpt.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.jobs import job
from nidl_dino.model import training_scan_volumes
from nidl_dino.tables import read_qc_table
from nidl_dino.training import train_from_config

with job(snakemake.log[0], "train") as log:
    qc = read_qc_table(snakemake.input.qc)
    volumes, _ = training_scan_volumes(
        qc, snakemake.params.preproc_dir, snakemake.params.train_scans
    )
    log.info(
        "training on %d of %d scans (the others were excluded by QC or by model.train_on)",
        len(volumes),
        len(qc),
    )
    summary = train_from_config(
        volumes,
        snakemake.params.config,
        work_dir=snakemake.params.work,
        teacher_path=snakemake.output.teacher,
        threads=snakemake.threads,
        memory_mb=snakemake.resources.get("mem_mb"),
    )
    work = Path(snakemake.params.work)
    for name, target in (("training_curves.png", "curves"), ("training_summary.json", "summary")):
        Path(snakemake.output[target]).write_bytes((work / name).read_bytes())
    log.info("trained: %s", summary)
