"""Features: the teacher file, extraction into per-scan tables, the cohort table."""
