# output_dir as a BIDS-derivatives dataset (dataset_description.json, .bidsignore), and the model
# card of the teacher whose features this run wrote (beside teacher.pt when trained here).


localrules:
    dataset_description,


rule dataset_description:
    output:
        description=f"{OUT}/dataset_description.json",
        bidsignore=f"{OUT}/.bidsignore",
    log:
        f"{OUT}/logs/dataset_description.log",
    conda:
        "../../envs/tables.yaml"
    params:
        bids_dir=config.get("bids_dir") or "",
        generated_by=generated_by(workflow.basedir),
    script:
        "../scripts/dataset_description.py"


rule model_card:
    input:
        teacher=TEACHER,
        scores=f"{OUT}/probes/scores.tsv",
    output:
        json=f"{OUT}/model/model_card.json",
        md=report(
            f"{OUT}/model/model_card.md",
            caption="../report/model_card.rst",
            category="Model",
        ),
    log:
        f"{OUT}/logs/model_card.log",
    conda:
        "../../envs/dino.yaml"
    resources:
        **aggregate_resources("model_card", len(SCAN_IDS)),
    script:
        "../scripts/model_card.py"
