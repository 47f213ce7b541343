# Teacher features for every scan that passed QC: one model load, one table per scan.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.features import extract_cohort  # noqa: E402
from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.tables import read_qc_table  # noqa: E402

with job(snakemake.log[0], "extract"):  # noqa: F821
    extract_cohort(
        teacher_path=snakemake.input.teacher,  # noqa: F821
        qc=read_qc_table(snakemake.input.qc),  # noqa: F821
        preproc_dir=snakemake.params.preproc_dir,  # noqa: F821
        manifest_path=snakemake.output.manifest,  # noqa: F821
        config=snakemake.params.config,  # noqa: F821
    )
