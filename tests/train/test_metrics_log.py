"""The metrics and sample tables across resumes: every step's rows exactly once, with the
run directory on local disk and on S3 (no Ray: a "worker" is a MetricsLog and its
SampleTable, a crash is dropping them without ``close``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from mmrad.rl.metrics import SAMPLES_FILE, SampleTable, read_samples
from mmrad.storage import Storage
from mmrad.train.metrics_log import METRICS_FILE, MetricsLog, metrics_dir, read_metrics
from tests.conftest import TEST_BUCKET


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_server")
    return f"s3://{TEST_BUCKET}/metrics-log/{uuid.uuid4().hex}"


def start(run_uri: str, scratch: Path, resume_step: int) -> tuple[MetricsLog, SampleTable]:
    """What rank 0 does when the trainer starts: the log and the sample table."""
    folder = metrics_dir(run_uri, scratch)
    log = MetricsLog(folder, run_uri, Storage(), resume_step=resume_step)
    return log, SampleTable(folder, log)


def attempt(
    run_uri: str,
    scratch: Path,
    resume_step: int,
    last_step: int,
    checkpoint_at: int | None = None,
    crash: bool = True,
) -> None:
    """Steps ``resume_step + 1 .. last_step``, each logging a metrics row and two sample
    rows tagged with this attempt; a checkpoint (``sync``) after ``checkpoint_at``; then a
    crash (no ``close``: on S3 the steps after the checkpoint are never uploaded) or the
    end of the run."""
    log, table = start(run_uri, scratch, resume_step)
    for step in range(resume_step + 1, last_step + 1):
        log.log(step, {"loss": 1.0 / step, "attempt": scratch.name})
        table.write(
            step, [{"step": step, "completion": f"{scratch.name} {step} {i}"} for i in (0, 1)]
        )
        if step == checkpoint_at:
            log.sync()
    if crash:
        log.writer.close()  # only stops TensorBoard's thread; nothing is uploaded
    else:
        log.close()


def tables(run_uri: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(step, attempt)`` of each metrics row and of each sample row, in file order."""
    metrics = [(row["step"], row["attempt"]) for row in read_metrics(Storage(), run_uri)]
    samples = [
        (row["step"], row["completion"].split()[0]) for row in read_samples(run_uri, Storage())
    ]
    return metrics, samples


def test_a_resume_keeps_each_steps_rows_once(run_uri, tmp_path):
    attempt(run_uri, tmp_path / "a1", resume_step=0, last_step=5, checkpoint_at=3)
    metrics, _ = tables(run_uri)
    # local: appended up to the crash; S3: uploaded at the checkpoint only
    assert [step for step, _ in metrics] == (
        [1, 2, 3] if run_uri.startswith("s3://") else [1, 2, 3, 4, 5]
    )

    attempt(run_uri, tmp_path / "a2", resume_step=3, last_step=7, crash=False)

    metrics, samples = tables(run_uri)
    expected = [(step, "a1" if step <= 3 else "a2") for step in range(1, 8)]
    assert metrics == expected
    assert samples == [row for row in expected for _ in (0, 1)]


def test_every_resume_cuts_again(run_uri, tmp_path):
    attempt(run_uri, tmp_path / "a1", resume_step=0, last_step=5, checkpoint_at=3)
    attempt(run_uri, tmp_path / "a2", resume_step=3, last_step=6, checkpoint_at=5)
    attempt(run_uri, tmp_path / "a3", resume_step=5, last_step=7, crash=False)

    metrics, samples = tables(run_uri)
    owner = {1: "a1", 2: "a1", 3: "a1", 4: "a2", 5: "a2", 6: "a3", 7: "a3"}
    assert metrics == list(owner.items())
    assert samples == [row for row in owner.items() for _ in (0, 1)]


def test_a_fresh_run_over_an_old_run_directory_starts_empty(run_uri, tmp_path):
    """Restored step 0: no checkpoint survived, so the rows already there are stale."""
    attempt(run_uri, tmp_path / "a1", resume_step=0, last_step=2, crash=False)
    assert tables(run_uri) != ([], [])

    log, _ = start(run_uri, tmp_path / "a2", resume_step=0)
    assert tables(run_uri) == ([], [])  # emptied when opened, not at the first upload
    log.close()

    attempt(run_uri, tmp_path / "a3", resume_step=0, last_step=3, crash=False)
    metrics, samples = tables(run_uri)
    assert metrics == [(1, "a3"), (2, "a3"), (3, "a3")]
    assert samples == [row for row in metrics for _ in (0, 1)]


def test_a_line_torn_by_a_crash_is_dropped_at_the_resume(tmp_path):
    run = tmp_path / "run"
    attempt(str(run), tmp_path / "a1", resume_step=0, last_step=2, crash=False)
    for name in (METRICS_FILE, SAMPLES_FILE):
        with open(run / name, "a") as handle:
            handle.write('{"step": 3, "lo')  # killed mid-write
    assert [row["step"] for row in read_metrics(Storage(), str(run))] == [1, 2]

    attempt(str(run), tmp_path / "a2", resume_step=2, last_step=3, crash=False)

    metrics, samples = tables(str(run))
    assert metrics == [(1, "a1"), (2, "a1"), (3, "a2")]
    assert samples == [row for row in metrics for _ in (0, 1)]
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [METRICS_FILE, SAMPLES_FILE]


def test_read_samples_still_takes_a_local_folder(tmp_path):
    attempt(str(tmp_path), tmp_path / "a1", resume_step=0, last_step=1, crash=False)
    assert [row["step"] for row in read_samples(tmp_path)] == [1, 1]
