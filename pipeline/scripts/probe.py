# Probes of the DINO features against the baselines: scores, predictions and a readable table.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

import pandas as pd  # noqa: E402

from nidl_dino.evaluation import evaluate_cohort  # noqa: E402
from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.probes import (  # noqa: E402
    COMPARISON_COLUMNS,
    compare_to_baselines,
    format_comparison_table,
    format_probe_table,
    judgement_caveat,
    write_probe_table,
)
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
    if len(predictions):
        comparison = compare_to_baselines(predictions)
    else:  # no probe could run (e.g. too few scans): an empty table, the note says why
        comparison = pd.DataFrame(columns=COMPARISON_COLUMNS)
    write_table_atomic(comparison, snakemake.output.comparison)  # noqa: F821
    cohort = pd.read_parquet(snakemake.input.cohort, columns=["status"])  # noqa: F821
    caveat = judgement_caveat(comparison, int((cohort["status"] == "ok").sum()))
    text = f"**{caveat}**\n\n" if caveat else ""
    text += format_probe_table(scores) if len(scores) else ""
    if len(comparison):
        text += (
            "\n\nDINO against each baseline on the same test folds (gain: positive when DINO "
            "is better, mean ± standard deviation over the folds):\n\n"
            + format_comparison_table(comparison)
        )
    text += f"\n\nNote: {note}" if note else ""
    Path(snakemake.output.table).write_text(text + "\n")  # noqa: F821
    log.info("probe table:\n%s", text)
