# output_dir as a BIDS-derivatives dataset (dataset_description.json, .bidsignore), and the model
# card of the teacher whose features this run wrote (beside teacher.pt when trained here).


localrules:
    dataset_description,


rule dataset_description:
    input:
        # the source dataset's description (SourceDatasets), also when a job generates it
        source_description(config, DEMO),
    output:
        description=LAYOUT.dataset_description,
        bidsignore=LAYOUT.bidsignore,
    log:
        LAYOUT.log("dataset_description"),
    conda:
        "../../envs/tables.yaml"
    params:
        # the source dataset's root (not only its description, which it may lack)
        bids_dir=lambda wc: config.get("bids_dir") or "",
        generated_by=generated_by(workflow.basedir),
        layout=LAYOUT.params([]),
    script:
        "../scripts/dataset_description.py"


rule model_card:
    input:
        teacher=TEACHER,
        scores=LAYOUT.probe_scores,
    output:
        json=LAYOUT.model_card_json,
        md=report(
            LAYOUT.model_card_md,
            caption="../report/model_card.rst",
            category="Model",
        ),
    log:
        LAYOUT.log("model_card"),
    conda:
        "../../envs/dino.yaml"
    resources:
        **aggregate_resources("model_card", len(SCAN_IDS)),
    script:
        "../scripts/model_card.py"
