# One self-contained HTML page (under 10 MB at any cohort size): probe table, predicted-vs-true age,
# feature embedding, training curves, excluded scans with reasons and their QC pictures, a sample
# of the others; the QC picture of every scan is on the montage pages it links to. The training
# curves only when the model was trained here (not with model.teacher); the model card always.


rule report:
    input:
        **(
            {
                "curves": LAYOUT.training_curves,
                "summary": LAYOUT.training_summary,
            }
            if TRAIN_HERE
            else {}
        ),
        qc=LAYOUT.qc_tsv,
        scores=LAYOUT.probe_scores,
        card=LAYOUT.model_card_md,
        predictions=LAYOUT.probe_predictions,
        comparison=LAYOUT.probe_comparison,
        cohort=LAYOUT.cohort_parquet,
    output:
        html=report(
            LAYOUT.report_html,
            caption="../report/report_html.rst",
            category="Report",
        ),
        montage=directory(LAYOUT.report_montage),
    log:
        LAYOUT.log("report"),
    conda:
        "../../envs/tables.yaml"
    resources:
        **aggregate_resources("report", len(SCAN_IDS)),
    params:
        layout=LAYOUT.params(),
        config=lambda wc: {
            k: config[k]
            for k in (
                "bids_dir",
                "encoder",
                "views",
                "data",
                "dino",
                "trainer",
                "extract",
                "seed",
            )
        },
    script:
        "../scripts/report.py"
