"""Session fixtures: one real control plane and one real S3 server for the whole run."""

from __future__ import annotations

import os
import re
import secrets
import signal
import tempfile
from pathlib import Path

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

