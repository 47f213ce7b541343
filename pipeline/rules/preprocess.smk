# Preprocessing: one job per scan. A rejected scan is a QC record with status "excluded" and its
# reason, never a failed job, so one bad file cannot stop the other subjects.


rule preprocess:
    input:
        lambda wc: SCAN_PATHS[wc.scan],
    output:
        directory(f"{OUT}/preproc/{{scan}}"),
    log:
        f"{OUT}/logs/preprocess/{{scan}}.log",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["preprocess"]["mem_mb"],
        runtime=config["resources"]["preprocess"]["runtime"],
    params:
        config=config["preprocessing"],
        ids=lambda wc: SCAN_IDS_OF[wc.scan],
    script:
        "../scripts/preprocess.py"


rule qc_table:
    input:
        expand(f"{OUT}/preproc/{{scan}}", scan=SCAN_IDS),
    output:
        f"{OUT}/qc/qc.tsv",
    log:
        f"{OUT}/logs/qc_table.log",
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/qc_table.py"
