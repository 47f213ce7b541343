# Train DINO on the scans that passed QC; resumes from model/work/checkpoints/last.ckpt.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from nidl_dino.jobs import job  # noqa: E402
from nidl_dino.tables import ok_volumes, read_qc_table  # noqa: E402
from nidl_dino.training import train_from_config  # noqa: E402

with job(snakemake.log[0], "train") as log:  # noqa: F821
    qc = read_qc_table(snakemake.input.qc)  # noqa: F821
    volumes = ok_volumes(qc, Path(snakemake.input.volumes[0]).parent)  # noqa: F821
    log.info("training on %d of %d scans (the others were excluded by QC)", len(volumes), len(qc))
    summary = train_from_config(
        volumes,
        snakemake.params.config,  # noqa: F821
        work_dir=snakemake.params.work,  # noqa: F821
        teacher_path=snakemake.output.teacher,  # noqa: F821
    )
    work = Path(snakemake.params.work)  # noqa: F821
    for name, target in (("training_curves.png", "curves"), ("training_summary.json", "summary")):
        Path(snakemake.output[target]).write_bytes((work / name).read_bytes())  # noqa: F821
    log.info("trained: %s", summary)
