# Are the features any good? Cross-validated linear probes of the DINO features and of baselines
# (random-weights encoder, intensity PCA, brain volume, chance) on the same scans and folds.
# Tables only: the baselines' inputs come from the extract job (features/baselines/).


rule probe:
    input:
        cohort=LAYOUT.cohort_parquet,
        qc=LAYOUT.qc_tsv,
        random_encoder=LAYOUT.baseline("random_encoder"),
        intensities=LAYOUT.baseline("intensities"),
        brain_histogram=LAYOUT.baseline("brain_histogram"),
    output:
        scores=report(
            LAYOUT.probe_scores,
            caption="../report/probe_scores.rst",
            category="Probes",
        ),
        predictions=LAYOUT.probe_predictions,
        comparison=report(
            LAYOUT.probe_comparison,
            caption="../report/comparison.rst",
            category="Probes",
        ),
        table=LAYOUT.probe_table,
    log:
        LAYOUT.log("probe"),
    conda:
        "../../envs/dino.yaml"
    threads: 1
    resources:
        **aggregate_resources("probe", len(SCAN_IDS)),
    params:
        config=config["probes"],
    script:
        "../scripts/probe.py"
