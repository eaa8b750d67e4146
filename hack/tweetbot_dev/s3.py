"""A real S3 server on loopback: MinIO built from its Go module, with a throw-away data directory."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .processes import stop_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    data_dir: Path
    bin_dir: Path
    port: int = 0
    access_key: str = ""
    secret_key: str = ""
    pid: int | None = None
    host: str = "127.0.0.1"  # the real node's pods need a non-loopback address (node.NODE_IP)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, log_file: Path, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.access_key = self.access_key or "tweetbot-" + secrets.token_hex(4)
        self.secret_key = self.secret_key or secrets.token_urlsafe(24)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.data_dir.parent),
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",  # no prompts, no telemetry-style checks: a disposable server
        }
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [
                    str(self.bin_dir / "minio"), "server", str(self.data_dir),
                    "--address", f"{self.host}:{self.port}",
                    "--console-address", f"127.0.0.1:{free_port()}",
                    "--quiet",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `tweetbot-dev up`; `tweetbot-dev down` or the reaper stops it
            )
        self.pid = process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"MinIO exited with code {process.returncode}; see {log_file}")
            # `ready` answers before the object layer is up (a loaded machine saw XMinioServerNotInitialized on the
            # first CreateBucket after it); `cluster` only once it has its write quorum.
            try:
                if all(self._healthy(check) for check in ("ready", "cluster")):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"MinIO did not become ready within {timeout:.0f}s; see {log_file}")

    def _healthy(self, check: str) -> bool:
        with urllib.request.urlopen(f"{self.endpoint}/minio/health/{check}", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        if self.pid is not None:
            stop_process(self.pid, expect="minio")
            self.pid = None
