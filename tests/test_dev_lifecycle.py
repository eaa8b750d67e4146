"""`tweetbot-dev up/env/down` and the reaper: a dev environment never outlives its owner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tweetbot_dev.binaries import cache_root
from tweetbot_dev.node import NODE_IP, NODE_NAME
from tweetbot_dev.processes import is_running
from tweetbot_dev.polling import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def home():
    runs = cache_root() / "test-runs"
    runs.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-lifecycle-", dir=runs))
    yield home
    shutil.rmtree(home, ignore_errors=True)  # `tweetbot-dev down` removes it; a failed test may not get that far


def tweetbot_dev(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tweetbot_dev.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_dev_up_env_down_from_the_command_line(home):
    up = tweetbot_dev("up", "--home", str(home))
    assert up.returncode == 0, up.stderr
    state = json.loads((home / "state.json").read_text())
    pids = [state["s3_pid"], *(int(p.read_text()) for p in (home / "kwok/clusters/tweetbot/pids").glob("*.pid")),
            *state["node_pids"].values()]
    assert sorted(state["node_pids"]) == ["containerd", "coredns", "kube-proxy", "kubelet"]
    assert len(pids) == 10 and all(is_running(pid) for pid in pids)
    assert oct((home / "state.json").stat().st_mode & 0o777) == "0o600"

    exports = tweetbot_dev("env", "--home", str(home))
    assert exports.returncode == 0, exports.stderr
    # What a person does next: eval the exports, then use the pinned kubectl and boto3's variables.
    shell = subprocess.run(
        ["bash", "-c", exports.stdout + 'kubectl get nodes -o name && echo "S3=$AWS_ENDPOINT_URL" && which helm'],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]},
    )
    assert shell.returncode == 0, shell.stderr
    assert "node/kwok-gpu-0" in shell.stdout and f"node/{NODE_NAME}" in shell.stdout
    assert f"S3=http://{NODE_IP}:{state['s3_port']}" in shell.stdout
    assert shell.stdout.strip().endswith("/helm") and "/tweetbot/bin/" in shell.stdout

    down = tweetbot_dev("down", "--home", str(home))
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(is_running(pid) for pid in pids), timeout=30, what="every component to stop")
    assert not home.exists()
    assert tweetbot_dev("env", "--home", str(home)).returncode == 1


def test_killed_owner_leaves_no_processes_behind(home):
    owner = subprocess.Popen(
        [
            sys.executable, "-c",
            "import json, os, sys, time\n"
            "from pathlib import Path\n"
            "from tweetbot_dev.devenv import DevEnvironment\n"
            "env = DevEnvironment.up(Path(sys.argv[1]), log=lambda m: None, owner_pid=os.getpid(), real_node=True)\n"
            "print(json.dumps([env.s3_pid, *env.cluster.component_pids().values(), *env.node_pids.values()]), flush=True)\n"
            "time.sleep(600)\n",
            str(home),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = json.loads(owner.stdout.readline())
        assert len(pids) == 10 and all(is_running(pid) for pid in pids)
    finally:
        owner.kill()  # no chance to clean up: only the reaper can
        owner.wait()
    wait_for(lambda: not any(is_running(pid) for pid in pids), timeout=60, what="the reaper to stop every component")
    wait_for(lambda: not home.exists(), timeout=10, what="the reaper to delete the state")
