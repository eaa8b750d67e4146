"""Waiting on eventually-consistent things (Kubernetes controllers, servers starting) in tests and tools."""

import subprocess
import time
import urllib.request
from pathlib import Path


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns something truthy, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_serving(process: subprocess.Popen, log: Path, url: str, what: str, timeout: float = 60.0) -> None:
    """Until `url` answers 200; at once, with the tail of its log, if the process that should serve it exits."""

    def serving():
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(serving, timeout=timeout, what=what)


def stop_child(process: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
