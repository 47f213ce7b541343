# dataset_description.json and .bidsignore of output_dir (a BIDS-derivatives dataset).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.workflow.derivatives import dataset_description, write_derivatives_files
from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.layout import Layout

with job(snakemake.log[0], "dataset_description"):
    write_derivatives_files(
        Layout(**snakemake.params.layout).output_dir,
        dataset_description(snakemake.params.bids_dir or None, snakemake.params.generated_by),
        description_path=snakemake.output.description,
        bidsignore_path=snakemake.output.bidsignore,
    )
