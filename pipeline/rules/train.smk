# Training: one job on the scans that passed QC. Checkpoints and logs go to model/work/, which is
# not a declared output: Snakemake keeps it when a killed job is re-run, and training resumes
# from model/work/checkpoints/last.ckpt.


rule train:
    input:
        qc=f"{OUT}/qc/qc.tsv",
        volumes=expand(f"{OUT}/preproc/{{scan}}", scan=SCAN_IDS),
    output:
        teacher=f"{OUT}/model/teacher.pt",
        curves=f"{OUT}/model/training_curves.png",
        summary=f"{OUT}/model/training_summary.json",
    log:
        f"{OUT}/logs/train.log",
    conda:
        "../../envs/dino.yaml"
    # torch's threads for the network (Snakemake lowers them to --cores on a workstation); the
    # view-making loader workers run beside them.
    threads: max(1, config["data"]["num_workers"], config["resources"]["train"].get("threads", 1))
    # config.yaml's resources.train; with trainer.devices: N > 1, N tasks on one node
    # (nidl_dino.distributed.train_job_resources)
    resources:
        **train_job_resources(config),
    params:
        work=f"{OUT}/model/work",
        config=lambda wc: {
            k: config[k]
            for k in ("seed", "encoder", "views", "data", "dino", "trainer")
        },
    script:
        "../scripts/train.py"
