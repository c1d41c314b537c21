"""Evaluation: batch evaluation (model directory or OpenAI-compatible endpoint), the
consistency checks and hinted inputs that annotation reuses, reports, figures, comparison."""
