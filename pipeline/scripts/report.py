# Write the HTML report of the run.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.report import write_report  # noqa: E402

with job(snakemake.log[0], "report"):  # noqa: F821
    pngs = {}
    for folder in map(Path, snakemake.input.volumes):  # noqa: F821
        picture = folder / f"{folder.name}_qc.png"
        if picture.exists():
            pngs[folder.name] = picture
    write_report(
        snakemake.output.html,  # noqa: F821
        qc_tsv=snakemake.input.qc,  # noqa: F821
        qc_pngs=pngs,
        curves_png=snakemake.input.curves,  # noqa: F821
        probe_scores_tsv=snakemake.input.scores,  # noqa: F821
        predictions_tsv=snakemake.input.predictions,  # noqa: F821
        cohort_parquet=snakemake.input.cohort,  # noqa: F821
        training_summary_json=snakemake.input.summary,  # noqa: F821
        config=snakemake.params.config,  # noqa: F821
        montage_dir=snakemake.output.montage,  # noqa: F821
    )
