# Training: one job on the scans that passed QC (those model.train_on selects). Not included when
# model.teacher is given. The teacher file records the preprocessing it expects (its model card). Checkpoints and logs go to model/work/, which is
# not a declared output: Snakemake keeps it when a killed job is re-run, and training resumes
# from model/work/checkpoints/last.ckpt.
from nidl_dino.workflow.setup import loader_threads


rule train:
    input:
        qc=LAYOUT.qc_tsv,
    output:
        teacher=LAYOUT.teacher,
        curves=report(
            LAYOUT.training_curves,
            caption="../report/training_curves.rst",
            category="Model",
        ),
        summary=LAYOUT.training_summary,
    log:
        LAYOUT.log("train"),
    conda:
        "../../envs/dino.yaml"
    # torch's threads for the network (Snakemake lowers them to --cores on a workstation); the
    # view-making loader workers run beside them.
    # data.num_workers: auto makes as many loader workers as threads.
    threads:
        loader_threads(
            config["data"]["num_workers"],
            config["resources"]["train"].get("threads", 1),
        )
    # config.yaml's resources.train; with trainer.devices: N > 1, N tasks on one node
    # (nidl_dino.training.resources.train_job_resources)
    resources:
        **train_job_resources(config),
    params:
        work=LAYOUT.model_work,
        layout=LAYOUT.params(),
        config=lambda wc: {
            k: config[k]
            for k in (
                "seed",
                "encoder",
                "views",
                "data",
                "dino",
                "trainer",
                "preprocessing",
                "model",
            )
        },
        # model.train_on: the scan ids to train on (None: every scan that passed QC)
        train_scans=MODEL["train_scans"],
    script:
        "../scripts/train.py"
