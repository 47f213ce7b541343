# The synthetic demo cohort (config demo.*), written by a job so a dry run writes nothing.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.demo import make_demo_dataset
from nidl_dino.workflow.jobs import job

with job(snakemake.log[0], "demo_data"):
    make_demo_dataset(snakemake.params.bids_dir, **snakemake.params.arguments)
