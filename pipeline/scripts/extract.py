# Teacher features for every scan that passed QC (one model load, one table per scan), and the
# baselines' inputs from the same pass over the volumes.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.features.extract import extract_cohort
from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import read_qc_table

with job(snakemake.log[0], "extract"):
    layout = Layout(**snakemake.params.layout)
    extract_cohort(
        teacher_path=snakemake.input.teacher,
        qc=read_qc_table(snakemake.input.qc),
        layout=layout,
        manifest_path=snakemake.output.manifest,
        config=snakemake.params.config,
        baselines_dir=layout.baselines_dir,
        threads=snakemake.threads,
    )
