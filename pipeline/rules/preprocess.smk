# Preprocessing: one job per batch of scans (resources.preprocess.scans_per_job), which pays the
# imports and template grids once and preprocesses each scan in its own process. A rejected scan
# is a QC record with status "excluded" and its reason, never a failed job, so one bad file cannot
# stop the other subjects. A scan's outputs are <OUT>/preproc/<scan_id>/; the batch's declared
# output is its table (scan_id, status, reason). A re-run skips the scans already done.


rule preprocess:
    input:
        lambda wc: [SCAN_PATHS[s] for s in BATCHES[wc.batch]],
    output:
        f"{OUT}/preproc/batches/{{batch}}.tsv",
    log:
        f"{OUT}/logs/preprocess/{{batch}}.log",
    conda:
        "../../envs/preprocess.yaml"
    threads: config["resources"]["preprocess"]["threads"]
    resources:
        mem_mb=config["resources"]["preprocess"]["mem_mb"],
        runtime=config["resources"]["preprocess"]["runtime"],
    params:
        scans=lambda wc: [
            {"scan_id": s, "path": SCAN_PATHS[s], **SCAN_IDS_OF[s]}
            for s in BATCHES[wc.batch]
        ],
        config=config["preprocessing"],
        # <OUT>/preproc, from the declared output
        preproc_dir=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
        log_dir=f"{OUT}/logs/preprocess",
    script:
        "../scripts/preprocess.py"


rule qc_table:
    input:
        expand(f"{OUT}/preproc/batches/{{batch}}.tsv", batch=list(BATCHES)),
    output:
        report(
            f"{OUT}/qc/qc.tsv",
            caption="../report/qc.rst",
            category="QC",
            labels={"table": "qc.tsv (excluded scans and reasons)"},
        ),
    log:
        f"{OUT}/logs/qc_table.log",
    conda:
        "../../envs/preprocess.yaml"
    resources:
        **aggregate_resources("qc_table", len(SCAN_IDS)),
    params:
        preproc_dir=lambda wc, input: os.path.dirname(os.path.dirname(input[0])),
    script:
        "../scripts/qc_table.py"
