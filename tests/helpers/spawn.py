"""Run a function on N real ranks of a gloo process group (torch.multiprocessing, no Ray):
for what FSDP does across ranks, checked without the cost of a Ray Train run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ["MMRAD_CHECK_COLLECTIVES"] = "1"
    from mmrad.train import collective_guard

    collective_guard.install()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args) -> None:
    """``fn(rank, *args)`` on ``world`` processes; raises if any rank fails. ``fn`` must be
    importable (a module-level function) and communicates results through files."""
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        mp.start_processes(
            _rank_main, args=(world, store, fn, args), nprocs=world, join=True, start_method="spawn"
        )
