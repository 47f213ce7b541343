# Preprocessing: one job per batch of scans (resources.preprocess.scans_per_job), which pays the
# imports and template grids once and preprocesses each scan in its own process. A rejected scan
# is a QC record with status "excluded" and its reason, never a failed job, so one bad file cannot
# stop the other subjects. A scan's outputs are in sub-<label>/[ses-<label>/]anat/ below
# output_dir, named after its BIDS entities (nidl_dino/workflow/layout.py). One rule per batch
# (preprocess_batch_NNNN), so that its declared outputs are its scans' own files: the batch table
# (scan_id, status, reason) and every scan's QC record and picture (an excluded or crashed scan
# has both too). Snakemake deletes them before it reruns a job (new subjects in the batch, a
# killed job); the job then restores the finished scans' record and picture from their
# signature files instead of preprocessing them again (nidl_dino/workflow/jobs.py).


for _batch, _scans in BATCHES.items():

    rule:
        name:
            preprocess_rule_name(_batch)
        input:
            [SCAN_PATHS[s] for s in _scans],
        output:
            table=LAYOUT.preproc_batch(_batch),
            qc=[LAYOUT.scan(s).qc_json for s in _scans],
            pictures=[LAYOUT.scan(s).qc_png for s in _scans],
        log:
            LAYOUT.preprocess_log(_batch),
        conda:
            "../../envs/preprocess.yaml"
        threads: config["resources"]["preprocess"]["threads"]
        resources:
            mem_mb=config["resources"]["preprocess"]["mem_mb"],
            runtime=config["resources"]["preprocess"]["runtime"],
        params:
            scans=[
                {"scan_id": s, "path": SCAN_PATHS[s], **SCAN_IDS_OF[s]} for s in _scans
            ],
            config=config["preprocessing"],
            # where the batch's files go: output_dir, the grid, the batch's source names
            layout=LAYOUT.params(_scans),
            log_dir=LAYOUT.preprocess_logs,
        script:
            "../scripts/preprocess.py"


rule qc_table:
    input:
        batches=[LAYOUT.preproc_batch(batch) for batch in BATCHES],
        # every scan's record: a scan without one makes its batch job run
        records=[LAYOUT.scan(s).qc_json for s in SCAN_IDS],
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
