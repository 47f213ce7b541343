# nidl-dino: brain MRI (BIDS) -> preprocessing -> DINO training -> per-subject feature tables.
# Thin on purpose: the logic lives in the nidl_dino package; rules are in pipeline/rules/.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml of this checkout is the base; --configfile/--config overlay it.
configfile: os.path.join(workflow.basedir, "config.yaml")


# The checkout's package is importable by the rules' scripts without installation, so the
# conda environments (--use-conda) only need the dependencies.
sys.path.insert(0, workflow.basedir)
from nidl_dino.distributed import train_job_resources
from nidl_dino.errors import UserError
from nidl_dino.inputs import scan_id_wildcard_constraint
from nidl_dino.workflow import check_config, discover, ensure_demo_data, fail

SCHEMA = f"{workflow.basedir}/pipeline/schemas/config.schema.yaml"
try:
    check_config(config, SCHEMA)  # one-line messages for the user
    validate(config, SCHEMA)  # fills the schema's defaults
    ensure_demo_data(config)
    SCANS = discover(config)
except UserError as err:
    fail(str(err))

OUT = config["output_dir"]
SCAN_IDS = list(SCANS["scan_id"])
SCAN_PATHS = dict(zip(SCANS["scan_id"], SCANS["path"]))


wildcard_constraints:
    scan=scan_id_wildcard_constraint(),


include: "pipeline/rules/preprocess.smk"
include: "pipeline/rules/train.smk"
include: "pipeline/rules/extract.smk"
include: "pipeline/rules/tables.smk"
include: "pipeline/rules/probe.smk"
include: "pipeline/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{OUT}/qc/qc.tsv",
        f"{OUT}/model/teacher.pt",
        f"{OUT}/model/training_curves.png",
        f"{OUT}/features/cohort.tsv",
        f"{OUT}/features/cohort.parquet",
        f"{OUT}/probes/scores.tsv",
        f"{OUT}/report/report.html",
