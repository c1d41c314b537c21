"""The settings mmrad gives a local Ray cluster it starts."""

from mmrad.config import RayConfig
from mmrad.ray_env import PREEMPTION_WATCHER, local_system_config, ray_environment


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
