"""The settings mmrad gives a local Ray cluster it starts."""

import pytest

from mmrad.config import RayConfig
from mmrad.ray_env import AUTO_CONNECT, PREEMPTION_WATCHER, local_system_config, ray_environment


def test_local_clusters_keep_warm_workers_when_asked():
    assert local_system_config(RayConfig()) is None
    assert local_system_config(RayConfig(warm_workers=6)) == {"num_workers_soft_limit": 6}


def test_the_preemption_watcher_is_off_unless_the_user_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    env = ray_environment(tmp_path)
    assert env[PREEMPTION_WATCHER] == "0"
    assert (tmp_path / "auth_token").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")
    assert ray_environment(tmp_path)[PREEMPTION_WATCHER] == "1"


def test_no_process_of_a_local_cluster_starts_a_ray_of_its_own(tmp_path):
    assert ray_environment(tmp_path)[AUTO_CONNECT] == "0"


@pytest.mark.integration
def test_the_session_clusters_workers_never_auto_init(ray_cluster):
    """A worker whose connection ended (an actor exiting with a Ray Data pipeline open)
    would otherwise start a Ray instance of its own on its call into Ray."""

    @ray_cluster.remote(num_cpus=0)
    def auto_connect() -> bool:
        from ray._private import auto_init_hook

        return auto_init_hook.enable_auto_connect

    assert ray_cluster.get(auto_connect.remote()) is False
