"""Supervised fine-tuning on chain-of-thought answers (Anomaly-R1's cold start)."""
