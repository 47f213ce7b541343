# The cohort table: every input scan with status, reason, participants.tsv columns and features.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.features.cohort import build_cohort
from nidl_dino.workflow.jobs import job

with job(snakemake.log[0], "cohort"):
    build_cohort(
        manifest_path=snakemake.input.manifest,
        qc_path=snakemake.input.qc,
        inputs_config=snakemake.params.inputs,
        out_tsv=snakemake.output.tsv,
        out_parquet=snakemake.output.parquet,
    )
