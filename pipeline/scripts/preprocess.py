# Preprocess one scan. Never fails for a bad scan: the QC record says "excluded" and why.
import os
import sys
from pathlib import Path

# ANTs/ITK use the job's threads only (it is imported lazily, after this line).
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(snakemake.threads)  # noqa: F821

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.jobs import (
    job,  # noqa: E402
    preprocess_or_exclude,  # noqa: E402
)

with job(snakemake.log[0], "preprocess"):  # noqa: F821
    preprocess_or_exclude(
        snakemake.input[0],  # noqa: F821
        snakemake.output[0],  # noqa: F821
        prefix=snakemake.wildcards.scan,  # noqa: F821
        config=snakemake.params.config,  # noqa: F821
        ids=snakemake.params.ids,  # noqa: F821
    )
