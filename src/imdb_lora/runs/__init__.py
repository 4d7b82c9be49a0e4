"""Run directories: layout, status, reports and model card, comparisons of runs."""
