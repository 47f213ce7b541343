# One self-contained HTML page (under 10 MB at any cohort size): probe table, predicted-vs-true age,
# feature embedding, training curves, excluded scans with reasons and their QC pictures, a sample
# of the others; the QC picture of every scan is on the montage pages it links to. The training
# curves only when the model was trained here (not with model.teacher); the model card always.


rule report:
    input:
        **(
            {
                "curves": f"{OUT}/model/training_curves.png",
                "summary": f"{OUT}/model/training_summary.json",
            }
            if TRAIN_HERE
            else {}
        ),
        qc=f"{OUT}/qc/qc.tsv",
        scores=f"{OUT}/probes/scores.tsv",
        card=f"{OUT}/model/model_card.md",
        predictions=f"{OUT}/probes/predictions.tsv",
        cohort=f"{OUT}/features/cohort.parquet",
    output:
        html=report(
            f"{OUT}/report/report.html",
            caption="../report/report_html.rst",
            category="Report",
        ),
        montage=directory(f"{OUT}/report/montage"),
    log:
        f"{OUT}/logs/report.log",
    conda:
        "../../envs/tables.yaml"
    resources:
        **aggregate_resources("report", len(SCAN_IDS)),
    params:
        preproc_dir=f"{OUT}/preproc",
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
