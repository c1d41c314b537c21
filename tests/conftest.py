"""Shared, session-scoped real parts: one S3 server (SeaweedFS on 127.0.0.1), GCS and Azure
emulators (fake-gcs-server, Azurite) and one local Ray cluster, started once and reused by
every test that needs them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers.cloud_emulators import AZURITE_KEY

pytest_plugins = ["tests.helpers.cpu_report"]

# Credentials for the local S3 server only; set before anything (Ray workers included)
# reads the environment.
TEST_ACCESS_KEY = "mmrad-test-key"
TEST_SECRET_KEY = "mmrad-test-secret-0123456789"
os.environ["AWS_ACCESS_KEY_ID"] = TEST_ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET_KEY
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)
# Every trainer process refuses collectives that NCCL would refuse (see
# mmrad.train.collective_guard); Ray workers inherit this from the session.
os.environ["MMRAD_CHECK_COLLECTIVES"] = "1"
# Every job a test runs logs to one MLflow store of the session (never the repo's runs/).
os.environ["MLFLOW_TRACKING_URI"] = (
    f"sqlite:///{tempfile.mkdtemp(prefix='mmrad-test-mlflow-')}/mlflow.db"
)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["WANDB_MODE"] = "offline"  # W&B never goes online from a test
# abfs:// tests sign in to Azurite with its published development key (no secret), from
# the environment as every Azure key is read; set before Ray workers start.
os.environ["AZURE_STORAGE_ACCOUNT_KEY"] = AZURITE_KEY
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's
# training runs ended (or noticed a dead worker) up to 2 s late; Ray workers inherit this.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"

TEST_BUCKET = "mmrad-test"
WARM_WORKERS = 6


BACKGROUND_RESET_EVERY = 25  # of mmrad's own GETs with a body
BACKGROUND_RESET_LIMIT = 200


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server behind a chaos proxy that cuts every 25th answer to mmrad's own
    GETs (200 at most): ``AWS_ENDPOINT_URL`` points at the proxy for the whole session,
    so every S3 test is also a test of the storage layer's retries. What the proxy did
    goes to ``runs/s3_background_faults.json``."""
    from urllib.parse import urlparse

    from mmrad.s3local import LocalS3
    from mmrad.storage import Storage
    from tests.helpers.chaos import ChaosProxy

    server = LocalS3(tmp_path_factory.mktemp("s3"))
    server.start()
    address = urlparse(server.endpoint_url)
    proxy = ChaosProxy(address.hostname, address.port, user_agent=b"Botocore")
    proxy.fault_every("reset", BACKGROUND_RESET_EVERY, BACKGROUND_RESET_LIMIT)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    Storage().ensure_bucket(f"s3://{TEST_BUCKET}")
    server.chaos = proxy
    yield server
    write_background_faults(proxy)
    proxy.close()
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


def write_background_faults(proxy) -> None:
    import json

    record = {"every": BACKGROUND_RESET_EVERY, "limit": BACKGROUND_RESET_LIMIT,
              "requests": proxy.requests, "injected": dict(proxy.counts())}  # fmt: skip
    out = Path(__file__).resolve().parents[1] / "runs" / "s3_background_faults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


@pytest.fixture(scope="session")
def s3_chaos(s3_server):
    """The chaos proxy in front of the session's S3 server, to inject bursts of faults
    into mmrad's own S3 calls (:class:`tests.helpers.chaos.ChaosProxy`)."""
    return s3_server.chaos


def _started(emulator):
    from tests.helpers.cloud_emulators import EmulatorMissing

    try:
        return emulator.start()
    except EmulatorMissing as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server on 127.0.0.1 (:class:`tests.helpers.cloud_emulators.LocalGcs`)."""
    from tests.helpers.cloud_emulators import LocalGcs

    server = _started(LocalGcs(tmp_path_factory.mktemp("gcs")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 (:class:`tests.helpers.cloud_emulators.LocalAzurite`)."""
    from tests.helpers.cloud_emulators import LocalAzurite

    server = _started(LocalAzurite(tmp_path_factory.mktemp("azurite")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One local Ray for the session (after the S3 variables are set, so workers see them)."""
    import ray

    from mmrad.config import RayConfig
    from mmrad.ray_env import init_ray

    state = Path(tmp_path_factory.mktemp("ray"))
    # Warm workers: each test's actors and tasks reuse processes whose imports are done.
    init_ray(RayConfig(num_cpus=2, state_dir=str(state), warm_workers=WARM_WORKERS))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_s3(s3_server):
    """A small synthetic data set on the S3 server, built once: ``(uri, records)``."""
    from mmrad.config import DataBuildConfig
    from mmrad.data.build import build_dataset
    from mmrad.data.manifest import read_manifest
    from mmrad.storage import Storage

    uri = f"s3://{TEST_BUCKET}/datasets/synthetic"
    config = DataBuildConfig(
        out=uri,
        seed=3,
        synthetic={"categories": ["brick", "coins", "grass"], "images_per_category": 8,
                   "image_size": 200},
        split={"test_categories": ["coins"], "val_fraction": 0.25},
    )  # fmt: skip
    build_dataset(config, Storage(), progress=False)
    return uri, read_manifest(Storage(), uri)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny random Qwen2.5-VL-shaped model, built once per session."""
    from mmrad.model.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def synthetic_local(tmp_path_factory) -> str:
    """A synthetic set on local storage for training tests; returns the manifest URI.

    Four seen categories and two unseen ones (coins, cell) in the test split."""
    from mmrad.config import DataBuildConfig
    from mmrad.data.build import build_dataset
    from mmrad.storage import Storage

    config = DataBuildConfig(
        out=str(tmp_path_factory.mktemp("data") / "synthetic"),
        seed=0,
        synthetic={"categories": ["brick", "grass", "gravel", "camera", "coins", "cell"],
                   "images_per_category": 24, "image_size": 112},
        split={"test_categories": ["coins", "cell"], "val_fraction": 0.1},
    )  # fmt: skip
    return build_dataset(config, Storage(), progress=False).manifest_uri


@pytest.fixture(scope="session")
def synthetic_local_on_s3(s3_server, synthetic_local) -> str:
    """``synthetic_local`` copied to S3, the same records and image bytes (its manifest
    names images relative to itself): the manifest's URI. Runs on it must equal runs on
    the local copy."""
    from mmrad.storage import Storage

    local = Path(synthetic_local)
    uri = f"s3://{TEST_BUCKET}/datasets/synthetic-copy"
    Storage().upload_dir(local.parent, uri)
    return f"{uri}/{local.name}"


@pytest.fixture(scope="session")
def sft_trained(ray_cluster, tiny_model, synthetic_local, tmp_path_factory):
    """One SFT run long enough to learn the answer format (full fine-tuning, FSDP2,
    2 workers), shared by the tests that need a trained export. The tiny model's greedy
    format rate after 80 steps swings with small changes of the loss (14-100% over lr
    0.002-0.004 and 80-120 steps with the global token mean): lr 0.004 gives 84%."""
    from mmrad.sft.job import run_sft
    from tests.sft.helpers import sft_config

    job = sft_config(
        tiny_model, synthetic_local, str(tmp_path_factory.mktemp("sft")), "trained",
        "lora.enabled=false", "optimizer.lr=0.004", "schedule.max_steps=80", "schedule.epochs=20",
        "schedule.checkpoint_every=40", "validation.every=20", "schedule.log_every=10",
    )  # fmt: skip
    return run_sft(job)


@pytest.fixture(scope="session")
def grpo_uninterrupted(sft_trained, synthetic_local, tmp_path_factory):
    """The final checkpoint of a GRPO run of ``EXACT_RUN`` without faults: what a
    resumed or healed run must equal."""
    from mmrad.rl.job import run_grpo
    from mmrad.storage import Storage
    from tests.helpers.checkpoints import latest_checkpoint, read_checkpoint
    from tests.helpers.grpo import EXACT_RUN, grpo_config

    storage = str(tmp_path_factory.mktemp("grpo-clean"))
    result = run_grpo(grpo_config(sft_trained.export_uri, synthetic_local, storage, "clean",
                                  *EXACT_RUN))  # fmt: skip
    return read_checkpoint(Storage(), latest_checkpoint(Storage(), result.run_uri))
