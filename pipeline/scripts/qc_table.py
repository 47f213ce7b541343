# Gather every scan's QC record into qc/qc.tsv (one row per input scan, in scan-list order).
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

import pandas as pd

from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import qc_table, write_table_atomic

with job(snakemake.log[0], "qc_table"):
    layout = Layout(**snakemake.params.layout)
    records = []
    for batch in snakemake.input.batches:
        for scan in pd.read_csv(batch, sep="\t", dtype=str)["scan_id"]:
            records.append(json.loads(layout.scan(scan).qc_json.read_text()))
    write_table_atomic(qc_table(records), snakemake.output[0])
