"""The one trainer core of the SFT workers and the GRPO learners (``core.py``) and its
parts: sharding, schedule, checkpoints, metrics log, export, progress."""
