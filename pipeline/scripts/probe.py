# Probes of the DINO features against the baselines: scores, predictions and a readable table.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

import pandas as pd  # noqa: E402

from nidl_dino.evaluation import evaluate_cohort  # noqa: E402
from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.probes import format_probe_table, write_probe_table  # noqa: E402
from nidl_dino.tables import read_qc_table, write_table_atomic  # noqa: E402

with job(snakemake.log[0], "probe") as log:  # noqa: F821
    scores, predictions, note = evaluate_cohort(
        pd.read_parquet(snakemake.input.cohort),  # noqa: F821
        read_qc_table(snakemake.input.qc),  # noqa: F821
        snakemake.input.teacher,  # noqa: F821
        snakemake.params.preproc_dir,  # noqa: F821
        snakemake.params.config,  # noqa: F821
    )
    write_probe_table(scores, snakemake.output.scores)  # noqa: F821
    write_table_atomic(predictions, snakemake.output.predictions)  # noqa: F821
    text = format_probe_table(scores) if len(scores) else ""
    text += f"\n\nNote: {note}" if note else ""
    Path(snakemake.output.table).write_text(text + "\n")  # noqa: F821
    log.info("probe table:\n%s", text)
