"""Evaluation: batch evaluation and annotation jobs, reports and figures."""
