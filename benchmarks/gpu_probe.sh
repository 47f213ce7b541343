#!/usr/bin/env bash
# The GPU recipe's probe table on a large generated cohort: the whole workflow on one GPU node.
#
#   bash benchmarks/gpu_probe.sh                   # 1,000 scans, 10 epochs, 16 cores, ./gpu-probe
#   SCANS=400 EPOCHS=20 CORES=8 OUT_DIR=/scratch/gp bash benchmarks/gpu_probe.sh
#
# Runs benchmarks/feature_quality.py on the tune set's `default` cohort (seed 11) with
# config.yaml + profiles/gpu_recipe.yaml (1.5 mm grid, resnet18, views on the device, bf16),
# overlaid by a budget file it writes into OUT_DIR: the number of epochs (the recipe keeps
# config.yaml's 90, about 20 min on one H200 at 1,000 scans) and preprocessing batches sized to
# the cores (SCANS / 8 scans per job, CORES / 2 scans at a time, two jobs at once). It prints the
# probe table (DINO against every baseline, the generator's latents as a ceiling) and the time of
# each stage. Re-running it with the same OUT_DIR resumes (Snakemake): finished cohorts, scans and
# models are kept. Needs a GPU (trainer.accelerator: gpu stops in one line without one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCANS="${SCANS:-1000}"
EPOCHS="${EPOCHS:-10}"
CORES="${CORES:-16}"
OUT_DIR="${OUT_DIR:-gpu-probe}"
VARIANT="${VARIANT:-default}"
mkdir -p "$OUT_DIR"
# a run killed by its time limit leaves Snakemake's lock: the next run resumes instead
rm -rf "$OUT_DIR"/*/.snakemake/locks
half=$((CORES / 2 > 0 ? CORES / 2 : 1))
cat >"$OUT_DIR/budget.yaml" <<EOF
# written by benchmarks/gpu_probe.sh
trainer:
  max_epochs: $EPOCHS
resources:
  preprocess: {threads: $half, scans_per_job: $(((SCANS + 7) / 8))}
EOF
exec python3 "$here/feature_quality.py" --variants "$VARIANT" --scans "$SCANS" --cores "$CORES" \
    --configfile "$here/../profiles/gpu_recipe.yaml" "$OUT_DIR/budget.yaml" --out "$OUT_DIR" "$@"
