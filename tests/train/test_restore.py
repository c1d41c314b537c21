"""A checkpoint on S3 restored by two ranks of one node: one download, no rewrite under a
reader, nothing left behind (real Ray Train, real S3 server)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_BUCKET

pytestmark = pytest.mark.integration


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_then_read(config: dict) -> None:
    import ray.train

    from mmrad.train.restore import checkpoint_folder

    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:  # the first fit: report a checkpoint of a few files
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                for index in range(4):
                    (Path(folder) / f"part_{index}.bin").write_bytes(bytes([index]) * 200_000)
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder))
        return
    if rank == 1:
        time.sleep(2.0)  # arrive after rank 0 has its copy
    with checkpoint_folder(checkpoint, context.get_local_rank()) as folder:
        first = _files(folder)
        time.sleep(3.0)  # still reading while a late rank would download
        again = _files(folder)
    seen = {"folder": str(folder), "unchanged": first == again, "files": sorted(first)}
    (Path(config["out"]) / f"rank_{rank}.json").write_text(json.dumps(seen))


def _trainer(run_name: str, out: Path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mmrad.storage import Storage

    filesystem, path = Storage().arrow_filesystem(f"s3://{TEST_BUCKET}/restore-test")
    return TorchTrainer(
        _write_then_read,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=filesystem),
    )


def test_two_ranks_of_a_node_read_one_download_that_nobody_rewrites(ray_cluster, tmp_path):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    _trainer("restore", tmp_path).fit()
    _trainer("restore", tmp_path).fit()  # the same run again: it resumes
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["folder"] == ranks[1]["folder"], "one download per node"
    for seen in ranks:
        assert seen["files"] == [f"part_{i}.bin" for i in range(4)]
        assert not Path(seen["folder"]).exists(), "the node's copy was left behind"
    assert ranks[0]["unchanged"], "a late rank rewrote the files rank 0 was reading"
