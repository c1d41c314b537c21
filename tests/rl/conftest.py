# TEMPORARY (grpo-loop helper dev only; deleted before hand-off)
import os
from types import SimpleNamespace

import pytest

if os.environ.get("MMRAD_GRPO_DEV"):

    @pytest.fixture(scope="session")
    def synthetic_local():
        return "/tmp/grpo/fixture/data/synthetic/manifest.parquet"

    @pytest.fixture(scope="session")
    def sft_trained(ray_cluster):
        return SimpleNamespace(export_uri="/tmp/grpo/fixture/sft/trained/export")
