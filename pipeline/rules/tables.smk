# The cohort table: every input scan, its status and reason, participants.tsv, its features.


rule cohort:
    input:
        manifest=LAYOUT.features_manifest,
        qc=LAYOUT.qc_tsv,
    output:
        tsv=LAYOUT.cohort_tsv,
        parquet=LAYOUT.cohort_parquet,
    log:
        LAYOUT.log("cohort"),
    conda:
        "../../envs/tables.yaml"
    resources:
        **aggregate_resources("cohort", len(SCAN_IDS)),
    params:
        inputs=lambda wc: {k: config.get(k) for k in ("bids_dir", "inputs")},
    script:
        "../scripts/cohort.py"
