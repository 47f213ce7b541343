"""The seam with Snakemake: config checks, inputs, participants, layout, jobs, tables."""
