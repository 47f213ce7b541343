# Preprocessing: one job per batch of scans (resources.preprocess.scans_per_job), which pays the
# imports and template grids once and preprocesses each scan in its own process. A rejected scan
# is a QC record with status "excluded" and its reason, never a failed job, so one bad file cannot
# stop the other subjects. A scan's outputs are in sub-<label>/[ses-<label>/]anat/ below
# output_dir, named after its BIDS entities (nidl_dino/workflow/layout.py); the batch's declared output is
# its table (scan_id, status, reason). A re-run skips the scans already done. Every scan's QC
# record and picture are written (an excluded or crashed scan's too) but not declared: Snakemake
# deletes a job's declared outputs before it reruns it (new subjects in the batch, a killed job),
# which would discard the batch's finished scans; update() outputs, which it keeps, do not make a
# job rerun when they are missing (tried: a grown batch was not rerun).


rule preprocess:
    input:
        lambda wc: [SCAN_PATHS[s] for s in BATCHES[wc.batch]],
    output:
        LAYOUT.preproc_batch("{batch}"),
    log:
        LAYOUT.preprocess_log("{batch}"),
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
        # where the batch's files go: output_dir, the grid, the batch's source names
        layout=lambda wc: LAYOUT.params(BATCHES[wc.batch]),
        log_dir=LAYOUT.preprocess_logs,
    script:
        "../scripts/preprocess.py"


rule qc_table:
    input:
        [LAYOUT.preproc_batch(batch) for batch in BATCHES],
    output:
        report(
            LAYOUT.qc_tsv,
            caption="../report/qc.rst",
            category="QC",
            labels={"table": "qc.tsv (excluded scans and reasons)"},
        ),
    log:
        LAYOUT.log("qc_table"),
    conda:
        "../../envs/preprocess.yaml"
    resources:
        **aggregate_resources("qc_table", len(SCAN_IDS)),
    params:
        layout=LAYOUT.params(),
    script:
        "../scripts/qc_table.py"
