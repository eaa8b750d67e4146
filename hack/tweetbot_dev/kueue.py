"""Kueue, built from its Go module (binaries.py), run beside the local control plane for the tests that need
an admission queue: its CRDs from the same module, its manager as a process with the admin kubeconfig.

Only the controllers run: no webhooks are registered with the API server (the operator creates queued Jobs
suspended itself, which is what Kueue's Job webhook would do), and the certificates its manager insists on
reading are self-signed ones made here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from .binaries import KUEUE, ensure_binaries
from .polling import stop_child, wait_serving
from .s3 import free_port

# Kueue reads its metrics server's certificate from this fixed path when it does not manage certificates.
METRICS_CERTS = Path("/etc/kueue/metrics/certs")


def module_dir() -> Path:
    """The Kueue module's source (its CRDs), from the Go module cache."""
    listed = subprocess.run(["go", "mod", "download", "-json", f"{KUEUE.package.split('/cmd/')[0]}@{KUEUE.version}"],
                            check=True, capture_output=True, text=True)
    return Path(json.loads(listed.stdout)["Dir"])


def _self_signed(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "tls.crt").is_file():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                        "-subj", "/CN=kueue-local", "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
                       check=True, capture_output=True)
    return directory


class KueueProcess:
    def __init__(self, dev_env, workdir: Path):
        self.dev_env, self.workdir = dev_env, workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        kubectl = str(self.dev_env.cluster.kubectl)
        crds = module_dir() / "config" / "components" / "crd" / "bases"
        # Server-side: the CRDs are too big for the last-applied annotation of a client-side apply.
        subprocess.run([kubectl, "--kubeconfig", str(self.dev_env.kubeconfig), "apply", "--server-side", "-f", str(crds)],
                       check=True, capture_output=True)
        subprocess.run([kubectl, "--kubeconfig", str(self.dev_env.kubeconfig), "wait", "--for=condition=Established",
                        "--timeout=60s", "-f", str(crds)], check=True, capture_output=True)
        _self_signed(METRICS_CERTS)
        health = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"port": free_port(), "host": "127.0.0.1", "certDir": str(_self_signed(self.workdir / "webhook-certs"))},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }
        (self.workdir / "kueue.yaml").write_text(yaml.safe_dump(config))
        self.log = self.workdir / "kueue.log"
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [str(ensure_binaries() / KUEUE.binary), f"--config={self.workdir / 'kueue.yaml'}",
                 "--feature-gates=VisibilityOnDemand=false"],
                env={**os.environ, "KUBECONFIG": str(self.dev_env.kubeconfig)},
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_serving(self.process, self.log, f"http://127.0.0.1:{health}/readyz", what="Kueue's readiness endpoint", timeout=120)
        except BaseException:  # a manager left running would suspend other tests' Jobs
            self.stop()
            raise

    def stop(self) -> None:
        stop_child(self.process)
