# Preprocess a batch of scans. Never fails for a bad scan: its QC record says "excluded" and why.
import os
import sys
from pathlib import Path

# ANTs/ITK: one thread per scan process (the job's threads are its processes); it is imported
# lazily, after this line.
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

import pandas as pd

from nidl_dino.workflow.jobs import job, preprocess_batch
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import write_table_atomic

with job(snakemake.log[0], "preprocess"):
    results = preprocess_batch(
        snakemake.params.scans,
        Layout(**snakemake.params.layout),
        snakemake.params.config,
        workers=snakemake.threads,
        log_dir=snakemake.params.log_dir,
        retry=f"snakemake --forcerun {snakemake.rule}",
    )
    write_table_atomic(pd.DataFrame(results), snakemake.output.table)
