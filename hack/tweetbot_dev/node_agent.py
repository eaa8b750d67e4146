"""A local node agent (development and test tooling, never shipped): the kubelet of one node whose pods run as
local processes, so the exact Jobs the operator makes really run on one machine.

It registers a Node, keeps it Ready, and for each pod bound to it runs the first container's command (the
image maps to this Python environment) with the pod's env (secretKeyRef resolved), emptyDir volumes as
temporary directories, and the pod's ServiceAccount as a kubeconfig; it reports Running, then the exit code
and the termination message, as a kubelet does. Deleting a pod stops its process.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

from .cluster import service_account_kubeconfig

# What each image runs when its pod gives no command: the image's entrypoint, from this environment.
ENTRYPOINTS = {"tweetbot-operator": ["tweetbot"], "tweetbot-trainer": []}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Running:
    process: subprocess.Popen
    workdir: Path
    started_at: str


class NodeAgent:
    def __init__(self, api: client.ApiClient, kubeconfig: Path, node: str = "local-0", cpu: str = "2",
                 memory: str = "16Gi", poll: float = 0.5):
        self.api, self.kubeconfig, self.node, self.poll = api, kubeconfig, node, poll
        self.core = client.CoreV1Api(api)
        self.capacity = {"cpu": cpu, "memory": memory, "pods": "20"}
        self.running: dict[str, Running] = {}
        self.finished: set[str] = set()
        self.logs: dict[str, str] = {}  # finished pods' output (start and end), by pod name, for tests and debugging
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"node-agent-{node}")
        self.bin_dir = Path(sys.executable).parent

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        node = {"metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                                                            "tweetbot.dev/local-agent": "true"}},
                "status": {"capacity": self.capacity, "allocatable": self.capacity}}
        try:
            self.core.create_node(node)
        except ApiException as error:
            if error.status != 409:
                raise
        self._heartbeat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for uid in list(self.running):
            self._kill(uid)

    def _heartbeat(self) -> None:
        now = _now()
        self.core.patch_node_status(self.node, {"status": {
            "capacity": self.capacity, "allocatable": self.capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "LocalAgentReady", "message": "local node agent",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "local-agent"}}})

    def _loop(self) -> None:
        last_heartbeat = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_heartbeat > 10:
                    self._heartbeat()
                    last_heartbeat = time.monotonic()
                self._sync()
            except Exception as error:  # keep serving; the next pass retries
                print(f"node agent: {type(error).__name__}: {error}", file=sys.stderr)
            self._stop.wait(self.poll)

    # --- pods ----------------------------------------------------------------------------------------

    def _sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}").items
        for pod in pods:
            uid = pod.metadata.uid
            if pod.metadata.deletion_timestamp is not None:
                self._kill(uid)
                try:
                    self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
                except ApiException as error:
                    if error.status != 404:
                        raise
            elif uid not in self.running and uid not in self.finished and pod.status.phase in (None, "Pending"):
                self._start(pod)
        for uid, running in list(self.running.items()):
            if running.process.poll() is not None:
                pod = next((p for p in pods if p.metadata.uid == uid), None)
                if pod is not None:
                    self._report_exit(pod, running)
                    self.logs[pod.metadata.name] = _head_and_tail((running.workdir / "container.log").read_bytes())
                self.running.pop(uid)
                self.finished.add(uid)
                shutil.rmtree(running.workdir, ignore_errors=True)

    def _start(self, pod) -> None:
        container = pod.spec.containers[0]
        workdir = Path(tempfile.mkdtemp(prefix=f"pod-{pod.metadata.name}-"))
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "HOME": str(workdir), "PYTHONUNBUFFERED": "1",
               "TWEETBOT_TERMINATION_MESSAGE_PATH": str(workdir / "termination-log")}
        for item in container.env or []:
            env[item.name] = (item.value or "") if item.value_from is None else self._secret_value(pod, item.value_from)
        for mount in container.volume_mounts or []:
            if mount.mount_path == "/tmp":
                (workdir / "tmp").mkdir(exist_ok=True)
                env["TMPDIR"] = str(workdir / "tmp")
        if pod.spec.service_account_name and pod.spec.automount_service_account_token is not False:
            env["KUBECONFIG"] = str(service_account_kubeconfig(
                self.core, self.kubeconfig, pod.metadata.namespace, pod.spec.service_account_name, workdir / "kubeconfig"))
        image = container.image.rsplit("/", 1)[-1].split(":")[0]
        command = list(container.command or ENTRYPOINTS.get(image, [])) + list(container.args or [])
        if command and (self.bin_dir / command[0]).exists():
            command[0] = str(self.bin_dir / command[0])
        log = open(workdir / "container.log", "wb")
        process = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        started = _now()
        self.running[pod.metadata.uid] = Running(process, workdir, started)
        self._patch_status(pod, "Running", {"running": {"startedAt": started}}, ready=True)

    def _secret_value(self, pod, value_from) -> str:
        ref = value_from.secret_key_ref
        if ref is None:
            return ""
        secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
        return base64.b64decode((secret.data or {})[ref.key]).decode()

    def _report_exit(self, pod, running: Running) -> None:
        code = running.process.returncode
        exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a container runtime says
        message_file = running.workdir / "termination-log"
        message = message_file.read_text()[:4096] if message_file.exists() else ""
        if not message and exit_code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            log = (running.workdir / "container.log").read_bytes()[-2048:].decode(errors="replace")
            message = "\n".join(log.splitlines()[-20:])
        state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                "message": message, "startedAt": running.started_at, "finishedAt": _now()}}
        self._patch_status(pod, "Succeeded" if exit_code == 0 else "Failed", state, ready=False)

    def _patch_status(self, pod, phase: str, state: dict, ready: bool) -> None:
        container = pod.spec.containers[0]
        now = _now()
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": {
            "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": pod.status.start_time or now,
            "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": now},
                           {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": now},
                           {"type": "Initialized", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [{"name": container.name, "image": container.image, "imageID": "", "ready": ready,
                                   "restartCount": 0, "started": ready, "state": state}],
        }})

    def pid_of(self, pod_name: str) -> int | None:
        """The process running a pod (tests kill it, as a node losing power would)."""
        for uid, running in self.running.items():
            if running.workdir.name.startswith(f"pod-{pod_name}-"):
                return running.process.pid
        return None

    def _kill(self, uid: str) -> None:
        running = self.running.pop(uid, None)
        if running is None:
            return
        try:
            os.killpg(running.process.pid, signal.SIGTERM)
            running.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(running.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.finished.add(uid)
        shutil.rmtree(running.workdir, ignore_errors=True)


def _head_and_tail(output: bytes, keep: int = 20_000) -> str:
    if len(output) > 2 * keep:
        output = output[:keep] + b"\n[...]\n" + output[-keep:]
    return output.decode(errors="replace")
