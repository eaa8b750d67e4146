"""Test stand-ins around the real operator: the operator as a child process, and a finished container.

kwok runs stage pods on fake nodes and leaves them Running; `play_container` finishes one as a kubelet
would, with a termination message, so the exact Jobs the operator made are what "ran".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from tweetbot_trainer.contract import StageResult

from .polling import stop_child, wait_for, wait_serving
from .s3 import free_port


class OperatorProcess:
    def __init__(self, dev_env, log_dir: Path, kubeconfig: Path | None = None, env: dict[str, str] | None = None):
        self.dev_env, self.log_dir = dev_env, log_dir
        self.kubeconfig = kubeconfig or dev_env.kubeconfig
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        health = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TWEETBOT_TRAINER_IMAGE": "tweetbot-trainer:test",
            "TWEETBOT_TIMER_SECONDS": "3",
            "TWEETBOT_METRICS_PORT": str(free_port()),
            "TWEETBOT_HEALTH_PORT": str(health),
            "TWEETBOT_S3_ENDPOINTS": self.dev_env.s3_endpoint,
            **self.extra_env,
        }
        self.log = self.log_dir / f"operator-{self.starts}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tweetbot_operator.cli", "operator"],
            env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )
        self.metrics_url = f"http://127.0.0.1:{env['TWEETBOT_METRICS_PORT']}/metrics"
        self.health_url = f"http://127.0.0.1:{health}/healthz"
        wait_serving(self.process, self.log, self.health_url, what="the operator's liveness endpoint")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_child(self.process)


def play_container(core, namespace, job_name, result: StageResult, exit_code=0, disrupted=False):
    """Finish the Job's running pod as a kubelet would, with `result` as the termination message; `disrupted`:
    as the kubelet leaves a pod evicted by the Eviction API, preempted or drained (condition DisruptionTarget)."""

    def running_pod():
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        return next((pod for pod in pods if pod.status.phase == "Running"), None)

    pod = wait_for(running_pod, what=f"a running pod of {job_name}")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    container = pod.spec.containers[0]
    conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                   "message": "Eviction API: evicting", "lastTransitionTime": now}] if disrupted else []
    core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "conditions": conditions,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                     "message": result.to_termination_message(), "startedAt": now, "finishedAt": now}},
        }],
    }})
