# Are the features any good? Cross-validated linear probes of the DINO features and of baselines
# (random-weights encoder, intensity PCA, brain volume, chance) on the same scans and folds.
# Tables only: the baselines' inputs come from the extract job (features/baselines/).


rule probe:
    input:
        cohort=f"{OUT}/features/cohort.parquet",
        qc=f"{OUT}/qc/qc.tsv",
        random_encoder=f"{OUT}/features/baselines/random_encoder.parquet",
        intensities=f"{OUT}/features/baselines/intensities.parquet",
        brain_histogram=f"{OUT}/features/baselines/brain_histogram.parquet",
    output:
        scores=report(
            f"{OUT}/probes/scores.tsv",
            caption="../report/probe_scores.rst",
            category="Probes",
        ),
        predictions=f"{OUT}/probes/predictions.tsv",
        comparison=report(
            f"{OUT}/probes/comparison.tsv",
            caption="../report/comparison.rst",
            category="Probes",
        ),
        table=f"{OUT}/probes/probe_table.md",
    log:
        f"{OUT}/logs/probe.log",
    conda:
        "../../envs/dino.yaml"
    threads: 1
    resources:
        **aggregate_resources("probe", len(SCAN_IDS)),
    params:
        config=config["probes"],
    script:
        "../scripts/probe.py"
