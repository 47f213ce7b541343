# Are the features any good? Cross-validated linear probes of the DINO features and of baselines
# (random-weights encoder, intensity PCA, brain volume, chance) on the same scans and folds.


rule probe:
    input:
        cohort=f"{OUT}/features/cohort.parquet",
        qc=f"{OUT}/qc/qc.tsv",
        teacher=TEACHER,
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
    params:
        config=lambda wc: {
            **config["probes"],
            "extract": config["extract"],
            # The random-weights baseline starts from DINO's own initial weights; the folds
            # keep probes.seed.
            "encoder_seed": config["seed"],
        },
        preproc_dir=f"{OUT}/preproc",
    script:
        "../scripts/probe.py"
