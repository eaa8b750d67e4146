"""The local development environment: one control plane and one S3 server, started and stopped together.

Its state (kubeconfig, S3 endpoint and throw-away credentials, pids) lives in a single directory, so
`tweetbot-dev up`, `env` and `down` can run as separate commands, and a test session can own a
private environment that a reaper process tears down if the session dies without cleaning up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .binaries import cache_root, ensure_binaries
from .cluster import Cluster
from .node import NODE_IP, RealNode, apiserver_patches, ensure_host_link, install_packages
from .processes import is_running
from .s3 import S3Server

STATE_FILE = "state.json"


def default_home() -> Path:
    return Path(os.environ.get("TWEETBOT_DEV_HOME") or cache_root() / "dev")


@dataclass
class DevEnvironment:
    home: Path
    bin_dir: Path
    cluster_name: str = "tweetbot"
    s3_port: int = 0
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_pid: int | None = None
    real_node: bool = False
    node_pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.cluster_name, self.home / "kwok", self.bin_dir)

    @property
    def s3(self) -> S3Server:
        return S3Server(
            self.home / "s3-data", self.bin_dir, self.s3_port, self.s3_access_key, self.s3_secret_key, self.s3_pid,
            host=self.host,
        )

    @property
    def host(self) -> str:
        """Where servers for the cluster's pods listen: loopback, or the real node's host address."""
        return NODE_IP if self.real_node else "127.0.0.1"

    @property
    def node(self) -> RealNode | None:
        if not self.real_node:
            return None
        return RealNode(self.home, self.bin_dir, self.kubeconfig, dict(self.node_pids))

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def load(cls, home: Path) -> DevEnvironment | None:
        try:
            state = json.loads((home / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(home=home, bin_dir=Path(state.pop("bin_dir")), **state)

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        state = {
            "bin_dir": str(self.bin_dir),
            "cluster_name": self.cluster_name,
            "s3_port": self.s3_port,
            "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key,
            "s3_pid": self.s3_pid,
            "real_node": self.real_node,
            "node_pids": self.node_pids,
            "timings": self.timings,
        }
        path = self.home / STATE_FILE
        path.touch(mode=0o600)  # holds the S3 server's credentials
        path.write_text(json.dumps(state, indent=2))

    @classmethod
    def up(cls, home: Path, log=print, owner_pid: int | None = None, nodes: list[dict] | None = None,
           real_node: bool = False, **cluster_options) -> DevEnvironment:
        """Start cluster and S3 under `home`; with `owner_pid`, a reaper tears both down when it exits.
        `nodes` replaces the default kwok nodes; `real_node` adds the machine's real node (node.py);
        `cluster_options` go to `Cluster.create`."""
        existing = cls.load(home)
        if existing is not None and existing.is_running():
            return existing
        if existing is not None:
            existing.down()
        env = cls(home=home, bin_dir=ensure_binaries(log), real_node=real_node)
        home.mkdir(parents=True, exist_ok=True)
        env.save()  # so a failed start can still be cleaned up by `down`
        if owner_pid is not None:
            start_reaper(owner_pid, home)
        try:
            started = time.monotonic()
            if real_node:
                install_packages(log)
                ensure_host_link()
                options, patches = apiserver_patches()
                cluster_options["options"] = {**options, **cluster_options.get("options", {})}
                cluster_options["patches"] = [*patches, *cluster_options.get("patches", [])]
            s3 = env.s3
            s3.start(home / "s3.log")
            env.s3_port, env.s3_access_key, env.s3_secret_key, env.s3_pid = (
                s3.port, s3.access_key, s3.secret_key, s3.pid
            )
            env.save()
            env.timings["s3_start_seconds"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            env.cluster.create(nodes, **cluster_options)
            env.timings["cluster_start_seconds"] = round(time.monotonic() - started, 2)
            env.save()
            if real_node:
                started = time.monotonic()
                node = env.node
                try:
                    node.start(log)
                finally:
                    env.node_pids = node.pids
                    env.save()
                env.timings["node_ready_seconds"] = round(time.monotonic() - started, 2)
                env.save()
        except BaseException:
            env.down()
            raise
        return env

    def load_images(self, log=print) -> dict:
        """Both images built from the repository's Dockerfiles (cached), loaded into the real node's containerd."""
        from .images import ensure_image
        from .node import load_image

        images = {name: ensure_image(name, log) for name in ("operator", "trainer")}
        for image in images.values():
            load_image(image.archive, image.ref, log)
        return images

    def is_running(self) -> bool:
        pids = self.cluster.component_pids()
        return (
            (not self.real_node or self.node.is_running())
            and self.s3_pid is not None
            and is_running(self.s3_pid, "minio")
            and bool(pids)
            and all(is_running(pid) for pid in pids.values())
        )

    def down(self) -> None:
        """Stop everything this environment started and delete its data; safe to call twice."""
        if self.real_node:
            self.node.stop()  # before the API server goes, so the kubelet does not retry against nothing
            self.node_pids = {}
        self.cluster.delete()
        self.s3.stop()
        self.s3_pid = None
        shutil.rmtree(self.home, ignore_errors=True)

    # --- what a person or a test needs to talk to it ---------------------------------------------

    def variables(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}",
        }

    def shell_exports(self) -> str:
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in self.variables().items())


def start_reaper(owner_pid: int, home: Path) -> None:
    """A detached watcher that runs `down` once `owner_pid` is gone, even if it was SIGKILLed."""
    subprocess.Popen(
        [sys.executable, "-m", "tweetbot_dev.reaper", str(owner_pid), str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
