# nidl-dino: brain MRI (BIDS) -> preprocessing -> DINO training -> per-subject feature tables.
# Thin on purpose: the logic lives in the nidl_dino package; rules are in pipeline/rules/.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


# Snakemake's own report (snakemake --report report.zip): results annotated with report().
report: "pipeline/report/workflow.rst"


# config.yaml of this checkout is the base; --configfile/--config overlay it.
configfile: os.path.join(workflow.basedir, "config.yaml")


# The checkout's package is importable by the rules' scripts without installation, so the
# conda environments (--use-conda) only need the dependencies.
sys.path.insert(0, workflow.basedir)
from nidl_dino.workflow.derivatives import generated_by
from nidl_dino.training.resources import train_job_resources
from nidl_dino.errors import UserError
from nidl_dino.workflow.inputs import scan_id_wildcard_constraint
from nidl_dino.workflow.layout import Layout, scan_sources
from nidl_dino.model import resolve_model
from nidl_dino.settings import SCHEMA_PATH
from nidl_dino.workflow.setup import (
    aggregate_resources,
    check_config,
    demo_plan,
    discover,
    fail,
    preprocess_batches,
    preprocess_rule_name,
    source_description,
    write_scan_cache,
)

# nidl_dino/config.schema.yaml: the one place config defaults are stated
SCHEMA = str(SCHEMA_PATH)
try:
    check_config(config, SCHEMA)  # one-line messages for the user
    validate(config, SCHEMA)  # fills the schema's defaults
    # the demo cohort (demo.*) when it is to be generated: a job writes it (demo_data rule), the
    # DAG is planned on its scans, and a dry run writes nothing
    DEMO = demo_plan(config)
    # a cluster job re-reads this file for its one job: it reads the cached scan list
    SCANS = discover(config, reuse_cache=workflow.remote_exec, demo=DEMO)
    # model.teacher (apply a trained model: checked against this run's preprocessing now) or
    # model.train_on (the training scans); a cluster job trusts the main process's check
    MODEL = resolve_model(config, SCANS, check=not workflow.remote_exec)
    # every path below output_dir (nidl_dino/workflow/layout.py); preprocessed files are named after
    # each scan's BIDS entities (its source name)
    LAYOUT = Layout.from_config(config, scan_sources(SCANS))
except UserError as err:
    fail(str(err))

SCAN_IDS = list(SCANS["scan_id"])
SCAN_PATHS = dict(zip(SCANS["scan_id"], SCANS["path"]))
# built once: per-job lookups stay O(1), so the DAG grows linearly with the cohort
SCAN_IDS_OF = {
    row.scan_id: {"participant_id": row.participant_id, "session_id": row.session_id}
    for row in SCANS[["scan_id", "participant_id", "session_id"]].itertuples(
        index=False
    )
}

# With model.teacher, features come from that file and nothing is trained (no train rule).
TRAIN_HERE = MODEL["teacher"] is None
TEACHER = LAYOUT.teacher if TRAIN_HERE else MODEL["teacher"]

# Preprocessing runs in batches of scans (one job each, see pipeline/rules/preprocess.smk).
BATCHES = preprocess_batches(
    SCAN_IDS, config["resources"]["preprocess"]["scans_per_job"]
)


onstart:
    write_scan_cache(config, SCANS)


wildcard_constraints:
    scan=scan_id_wildcard_constraint(),


if DEMO is not None:

    include: "pipeline/rules/demo.smk"


include: "pipeline/rules/preprocess.smk"


if TRAIN_HERE:

    include: "pipeline/rules/train.smk"


include: "pipeline/rules/extract.smk"
include: "pipeline/rules/tables.smk"
include: "pipeline/rules/probe.smk"
include: "pipeline/rules/report.smk"
include: "pipeline/rules/derivatives.smk"


rule all:
    default_target: True
    input:
        LAYOUT.dataset_description,
        LAYOUT.qc_tsv,
        TEACHER,
        LAYOUT.training_curves if TRAIN_HERE else [],
        LAYOUT.model_card_json,
        LAYOUT.cohort_tsv,
        LAYOUT.cohort_parquet,
        LAYOUT.probe_scores,
        LAYOUT.report_html,
