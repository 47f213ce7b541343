# Write the HTML report of the run.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

from nidl_dino.evaluation.report import write_report
from nidl_dino.workflow.jobs import job
from nidl_dino.workflow.layout import Layout
from nidl_dino.workflow.tables import read_qc_table

with job(snakemake.log[0], "report"):
    layout = Layout(**snakemake.params.layout)
    # every scan's picture: a declared output of its batch's job, which qc.tsv depends on (each
    # scan's record, written with its picture); not listed as inputs here, which would double
    # the DAG's cost at 10,000 scans
    pngs = {scan: layout.scan(scan).qc_png for scan in read_qc_table(snakemake.input.qc)["scan_id"]}
    write_report(
        snakemake.output.html,
        qc_tsv=snakemake.input.qc,
        qc_pngs=pngs,
        curves_png=snakemake.input.get("curves"),
        probe_scores_tsv=snakemake.input.scores,
        predictions_tsv=snakemake.input.predictions,
        comparison_tsv=snakemake.input.comparison,
        cohort_parquet=snakemake.input.cohort,
        training_summary_json=snakemake.input.get("summary"),
        model_card_md=snakemake.input.card,
        config=snakemake.params.config,
        montage_dir=snakemake.output.montage,
    )
