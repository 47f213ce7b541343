"""Evaluation: baselines, cross-validated probes and the HTML report."""
