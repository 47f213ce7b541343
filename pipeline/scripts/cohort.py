# The cohort table: every input scan with status, reason, participants.tsv columns and features.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.cohort import build_cohort  # noqa: E402
from nidl_dino.jobs import job  # noqa: E402

with job(snakemake.log[0], "cohort"):  # noqa: F821
    build_cohort(
        manifest_path=snakemake.input.manifest,  # noqa: F821
        qc_path=snakemake.input.qc,  # noqa: F821
        inputs_config=snakemake.params.inputs,  # noqa: F821
        out_tsv=snakemake.output.tsv,  # noqa: F821
        out_parquet=snakemake.output.parquet,  # noqa: F821
    )
