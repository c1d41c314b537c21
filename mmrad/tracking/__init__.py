"""Experiment trackers: MLflow (the embedded default) and Weights & Biases.

Every run keeps its own tables (``metrics.jsonl``, ``samples.jsonl``) in its run
directory; trackers are a view of them for comparing runs. They are written from one
process per run, the job's driver, so nothing local crosses nodes: training workers
hand their rows to the driver (through the run's progress board, live) and the driver
reads the run directory's tables at the end for any row it missed.

- :mod:`.values`: config → parameters, a metrics row → metric values.
- :mod:`.mlflow_run` and :mod:`.wandb_run`: one tracked run each, resumed by run URI.
- :mod:`.run`: the trackers ``run.loggers`` names, opened for one run.
- :mod:`.tune`: Ray Tune's own logger callbacks, resuming trials' runs.
"""
