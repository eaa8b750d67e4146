"""Stopping local server processes without hitting an unrelated process that reused a pid."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def is_running(pid: int, expect: str = "") -> bool:
    """True if `pid` is alive (not a zombie) and, when given, its command line mentions `expect`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and expect in cmdline


def stop_process(pid: int, expect: str = "", grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaps it if it is our child."""
    if not is_running(pid, expect):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_running(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
