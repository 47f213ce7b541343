# The cohort table: every input scan, its status and reason, participants.tsv, its features.


rule cohort:
    input:
        manifest=f"{OUT}/features/manifest.tsv",
        qc=f"{OUT}/qc/qc.tsv",
    output:
        tsv=f"{OUT}/features/cohort.tsv",
        parquet=f"{OUT}/features/cohort.parquet",
    log:
        f"{OUT}/logs/cohort.log",
    conda:
        "../../envs/tables.yaml"
    resources:
        **aggregate_resources("cohort", len(SCAN_IDS)),
    params:
        inputs=lambda wc: {k: config.get(k) for k in ("bids_dir", "inputs")},
    script:
        "../scripts/cohort.py"
