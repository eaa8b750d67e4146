"""Session fixtures: one real control plane and one real S3 server for the whole run."""

from __future__ import annotations

import os
import re
import secrets
import signal
import tempfile
from pathlib import Path

import importlib

import pytest

from tweetbot_dev.binaries import cache_root
from tweetbot_dev.devenv import DevEnvironment


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # SIGTERM (CI time-outs, `kill`) unwinds like Ctrl-C, so session fixtures tear the cluster down;
    # a SIGKILL is left to the reaper that DevEnvironment.up starts.
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def dev_env():
    runs = cache_root() / "test-runs"
    runs.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=runs))
    env = DevEnvironment.up(home, log=print, owner_pid=os.getpid())
    try:
        yield env
    finally:
        env.down()


@pytest.fixture(scope="session")
def new_bucket(dev_env):
    """make(prefix) -> (a boto3 client of the dev S3, a new bucket `<prefix>-<pid>` in it)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                      aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")

    def make(prefix: str):
        bucket = f"{prefix}-{os.getpid()}"
        s3.create_bucket(Bucket=bucket)
        return s3, bucket

    return make


@pytest.fixture(scope="session")
def api_client(dev_env):
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(dev_env.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def namespace(api_client, request):
    """A fresh namespace per test, deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    readable = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{readable}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)



@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub, with the environment pointing huggingface_hub and transformers at it."""
    from huggingface_hub import constants
    from transformers.utils import hub as transformers_hub

    from tweetbot_dev.fake_hub import FakeHub

    with FakeHub(tokens={"hf_good": "alice"}, orgs={"alice": ["tweetbots"]}) as server:
        for name, value in {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home"),
                            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        # huggingface_hub copies the environment into `constants` when first imported (maybe by another test):
        # re-read it now, and again once the environment is restored.
        importlib.reload(constants)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers caches an HfApi and its endpoint
        try:
            yield server
        finally:
            monkeypatch.undo()
            importlib.reload(constants)
