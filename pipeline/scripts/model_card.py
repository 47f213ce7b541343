# The model card (JSON and Markdown) of the teacher that made this run's features.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))

import pandas as pd

from nidl_dino.model import model_card, write_card
from nidl_dino.workflow.jobs import job

with job(snakemake.log[0], "model_card"):
    scores = pd.read_csv(snakemake.input.scores, sep="\t")
    card = model_card(snakemake.input.teacher, probe_scores=scores)
    write_card(card, snakemake.output.json, snakemake.output.md)
