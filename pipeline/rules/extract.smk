# Feature extraction: one batched job (one model load) for the whole cohort, which writes one
# table per scan (features/<scan_id>.tsv) and a manifest of them. Excluded scans get no table.
# A table made by the same model, readout and preprocessing is kept as it is: a study that grows
# under a given teacher (model.teacher) extracts only its new scans.


rule extract:
    input:
        teacher=TEACHER,
        qc=f"{OUT}/qc/qc.tsv",
    output:
        manifest=f"{OUT}/features/manifest.tsv",
    log:
        f"{OUT}/logs/extract.log",
    conda:
        "../../envs/dino.yaml"
    threads:
        max(
            1,
            config["extract"]["num_workers"],
            config["resources"]["extract"].get("threads", 1),
        )
    resources:
        gpu=config["resources"]["extract"]["gpu"],
        mem_mb=config["resources"]["extract"]["mem_mb"],
        runtime=config["resources"]["extract"]["runtime"],
        tasks_per_gpu=0,  # one process (see rule train)
    params:
        scans=SCANS[["scan_id", "participant_id", "session_id"]].to_dict("records"),
        config=lambda wc: {**config["extract"], "trainer": config["trainer"]},
        preproc_dir=f"{OUT}/preproc",
    script:
        "../scripts/extract.py"
