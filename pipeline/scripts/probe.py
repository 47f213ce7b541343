# Probes of the DINO features against the baselines: scores, predictions and a readable table.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

import pandas as pd

from nidl_dino.evaluation.probes import (
    COMPARISON_COLUMNS,
    compare_to_baselines,
    format_comparison_table,
    format_probe_table,
    judgement_caveat,
    write_probe_table,
)
from nidl_dino.evaluation.probing import evaluate_cohort
from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.tables import read_qc_table, write_table_atomic

with job(snakemake.log[0], "probe") as log:
    scores, predictions, note = evaluate_cohort(
        pd.read_parquet(snakemake.input.cohort),
        read_qc_table(snakemake.input.qc),
        {
            "random_encoder": snakemake.input.random_encoder,
            "intensities": snakemake.input.intensities,
            "brain_histogram": snakemake.input.brain_histogram,
        },
        snakemake.params.config,
    )
    write_probe_table(scores, snakemake.output.scores)
    write_table_atomic(predictions, snakemake.output.predictions)
    if len(predictions):
        comparison = compare_to_baselines(predictions)
    else:  # no probe could run (e.g. too few scans): an empty table, the note says why
        comparison = pd.DataFrame(columns=COMPARISON_COLUMNS)
    write_table_atomic(comparison, snakemake.output.comparison)
    cohort = pd.read_parquet(snakemake.input.cohort, columns=["status"])
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
    Path(snakemake.output.table).write_text(text + "\n")
    log.info("probe table:\n%s", text)
