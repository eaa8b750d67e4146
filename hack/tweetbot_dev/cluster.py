"""A real Kubernetes control plane on loopback: kwokctl's binary runtime pointed at our own builds.

etcd, kube-apiserver (TLS, RBAC, service-account signing), kube-controller-manager (Job controller,
garbage collector), kube-scheduler and kwok run as local processes; kwok plays the kubelet of fake CPU
and GPU nodes, so pods are scheduled and Jobs run to completion without containers.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from .binaries import KUBERNETES_VERSION

GPU_RESOURCE = "nvidia.com/gpu"
# The taint GKE and the NVIDIA GPU operator put on GPU nodes: only pods that tolerate it land there.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_NODE_LABEL = "nvidia.com/gpu.present"
# kwok completes Job pods at once, except TweetBot stage pods: see kwok-stages.yaml.
POD_STAGES = Path(__file__).with_name("kwok-stages.yaml")


def kwokctl_config(bin_dir: Path, options: dict | None = None, patches: list[dict] | None = None) -> dict:
    """kwokctl settings: our pinned binaries, everything bound to loopback, nothing downloaded.
    `options` and component `patches` add to these (the benchmarks turn on audit logging)."""
    return {
        "kind": "KwokctlConfiguration",
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "options": {
            "runtime": "binary",
            "kubeVersion": KUBERNETES_VERSION,
            "bindAddress": "127.0.0.1",
            "securePort": True,
            "kubeAuthorization": True,
            "kubeAdmission": True,
            "kubeApiserverBinary": str(bin_dir / "kube-apiserver"),
            "kubeControllerManagerBinary": str(bin_dir / "kube-controller-manager"),
            "kubeSchedulerBinary": str(bin_dir / "kube-scheduler"),
            "kubectlBinary": str(bin_dir / "kubectl"),
            "etcdBinary": str(bin_dir / "etcd"),
            "kwokControllerBinary": str(bin_dir / "kwok"),
            # kwok's Logs objects: a test names a file that kwok serves (and follows) as a fake pod's log.
            "enableCRDs": ["Logs"],
            **(options or {}),
        },
        # kwok plays the kubelet only of nodes annotated as fake, so a local node agent can own another node.
        "componentsPatches": [{"name": "kwok-controller", "extraArgs": [
            {"key": "manage-all-nodes", "value": "false"},
            {"key": "manage-nodes-with-annotation-selector", "value": "kwok.x-k8s.io/node=fake"},
        ]}, *(patches or [])],
    }


def fake_node(name: str, *, cpu: str = "32", memory: str = "128Gi", gpus: int = 0, pods: int = 110) -> dict:
    """A Node that kwok keeps Ready; GPU nodes advertise nvidia.com/gpu and carry the GPU taint."""
    capacity = {"cpu": cpu, "memory": memory, "pods": str(pods)}
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "type": "kwok"}
    spec: dict = {}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels[GPU_NODE_LABEL] = "true"
        spec["taints"] = [GPU_TAINT]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def fake_nodes(cpu_nodes: int = 2, gpu_nodes: int = 2, gpus_per_node: int = 4) -> list[dict]:
    return [fake_node(f"kwok-cpu-{i}") for i in range(cpu_nodes)] + [
        fake_node(f"kwok-gpu-{i}", gpus=gpus_per_node) for i in range(gpu_nodes)
    ]


@dataclass
class Cluster:
    """One kwokctl cluster whose state lives under `workdir` (KWOK_WORKDIR)."""

    name: str
    workdir: Path
    bin_dir: Path

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def config_file(self) -> Path:
        return self.workdir / "kwokctl.yaml"

    def _kwokctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "KWOK_WORKDIR": str(self.workdir), "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(
            [str(self.bin_dir / "kwokctl"), "--config", str(self.config_file), *args],
            env=env,
            capture_output=True,
            text=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kwokctl {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        return result

    def kubectl_run(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def create(self, nodes: list[dict] | None = None, wait: str = "2m", *, options: dict | None = None,
               patches: list[dict] | None = None, stages: str = "") -> None:
        """`stages` (kwok Stage documents) come after ours, for pods that ours leave alone."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            yaml.safe_dump(kwokctl_config(self.bin_dir, options, patches)) + "---\n" + POD_STAGES.read_text()
            + ("---\n" + stages if stages else "")
        )
        try:
            self._kwokctl(
                "create", "cluster", "--name", self.name, "--kubeconfig", str(self.kubeconfig), "--wait", wait
            )
            nodes = fake_nodes() if nodes is None else nodes
            if nodes:
                self.kubectl_run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}))
                self.kubectl_run("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Stop every component and remove the cluster's state; safe to call twice."""
        if (self.workdir / "clusters" / self.name).exists():
            self._kwokctl("delete", "cluster", "--name", self.name, "--kubeconfig", str(self.kubeconfig), check=False)

    def component_pids(self) -> dict[str, int]:
        pids = {}
        for pid_file in (self.workdir / "clusters" / self.name / "pids").glob("*.pid"):
            try:
                pids[pid_file.stem] = int(pid_file.read_text().strip())
            except ValueError:
                continue
        return pids


def service_account_kubeconfig(core, admin_kubeconfig: Path, namespace: str, account: str, path: Path,
                               seconds: int = 86400) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token), as a pod in the cluster
    would: the account's RBAC, without in-cluster files."""
    token = core.create_namespaced_service_account_token(account, namespace, {"spec": {"expirationSeconds": seconds}}).status.token
    cluster = yaml.safe_load(admin_kubeconfig.read_text())["clusters"][0]["cluster"]
    ca = Path(cluster["certificate-authority"]).read_bytes()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": account,
        "clusters": [{"name": "local", "cluster": {"server": cluster["server"],
                                                    "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": account}}],
    }))
    return path
