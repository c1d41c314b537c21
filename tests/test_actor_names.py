"""A rerun takes over the named actors of a killed driver's run, but never a live run's
(real Ray: the session's cluster, the namespace every mmrad driver joins)."""

from __future__ import annotations

import pytest

from mmrad.actor_names import RunStillAlive, wait_until_free
from mmrad.rl.coordinator import coordinator_name

pytestmark = pytest.mark.integration


def test_a_live_run_of_the_same_name_is_refused_and_a_freed_name_is_taken(ray_cluster):
    ray = ray_cluster
    name = coordinator_name("busy")

    @ray.remote(num_cpus=0)
    class Holder:
        def ping(self) -> bool:
            return True

    holder = Holder.options(name=name).remote()
    ray.get(holder.ping.remote())
    with pytest.raises(RunStillAlive, match=f"run.name busy is still running: its actor {name}"):
        wait_until_free(name, "run.name busy", timeout_s=1.0)
    ray.kill(holder)
    wait_until_free(name, "run.name busy", timeout_s=30.0)  # returns once Ray ended it
    with pytest.raises(ValueError):
        ray.get_actor(name)
