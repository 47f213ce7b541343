# Gather every scan's QC record into qc/qc.tsv (one row per input scan).
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.tables import qc_table, write_table_atomic  # noqa: E402

with job(snakemake.log[0], "qc_table"):  # noqa: F821
    records = []
    for folder in snakemake.input:  # noqa: F821
        record_file = next(Path(folder).glob("*_qc.json"))
        records.append(json.loads(record_file.read_text()))
    write_table_atomic(qc_table(records), snakemake.output[0])  # noqa: F821
