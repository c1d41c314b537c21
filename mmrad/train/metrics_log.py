"""Training metrics to JSONL and TensorBoard in the run directory.

Files are written locally (on the reporting worker) and, when the run directory is on
S3, uploaded whole at every checkpoint and at the end (S3 objects cannot be appended to).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmrad.storage import Storage, is_s3, join

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    def __init__(self, local_dir: Path, run_uri: str, storage: Storage):
        from tensorboardX import SummaryWriter

        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.run_uri = run_uri
        self.storage = storage
        self.writer = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR))

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.local_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def sync(self) -> None:
        """Copy the metrics files into the run directory (a no-op when it is local)."""
        if is_s3(self.run_uri):
            self.storage.upload_dir(self.local_dir, self.run_uri)

    def close(self) -> None:
        self.writer.close()
        self.sync()


def metrics_dir(run_uri: str, scratch: Path) -> Path:
    """Where a worker writes metrics: the run directory itself when local, else scratch."""
    return scratch if is_s3(run_uri) else Path(run_uri)


def read_metrics(storage: Storage, run_uri: str) -> list[dict]:
    text = storage.read_text(join(run_uri, METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
