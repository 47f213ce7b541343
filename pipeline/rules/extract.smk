# Feature extraction: one batched job (one model load) for the whole cohort, which writes one
# table per scan (features/<scan_id>.tsv) and a manifest of them. Excluded scans get no table.
# A table made by the same model, readout and preprocessing is kept as it is: a study that grows
# under a given teacher (model.teacher) extracts only its new scans.
# The same pass over the volumes, on the same device, writes the baselines' inputs that the
# probe job reads (features/baselines/): random-weights encoder features, downsampled volumes.
from nidl_dino.workflow.setup import loader_threads


rule extract:
    input:
        teacher=TEACHER,
        qc=LAYOUT.qc_tsv,
    output:
        manifest=LAYOUT.features_manifest,
        random_encoder=LAYOUT.baseline("random_encoder"),
        intensities=LAYOUT.baseline("intensities"),
        brain_histogram=LAYOUT.baseline("brain_histogram"),
    log:
        LAYOUT.log("extract"),
    conda:
        "../../envs/dino.yaml"
    # extract.num_workers: auto makes as many loader workers as threads.
    threads:
        loader_threads(
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
        # the part of config.yaml extraction reads, in its shape (nidl_dino.features.extract); the seed
        # gives the random-weights baseline DINO's own initial weights
        config=lambda wc: {
            "extract": config["extract"],
            "trainer": config["trainer"],
            "seed": config["seed"],
            "probes": {"pca": config["probes"]["pca"]},
        },
        layout=LAYOUT.params(),
    script:
        "../scripts/extract.py"
