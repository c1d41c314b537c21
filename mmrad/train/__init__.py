"""Pieces shared by the SFT job and the GRPO learners: sharding, schedules, checkpoints,
metrics and progress."""
