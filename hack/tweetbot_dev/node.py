"""A real node beside the kwok nodes: Debian's containerd and runc, a CNI bridge, and the kubelet, kube-proxy
and CoreDNS built from Go modules at the pinned versions.

Pods on it are containers from images loaded into containerd (nothing can be pulled here), run under the
pod's securityContext by runc, with a pod IP on the bridge, Service routing by kube-proxy's iptables rules
and cluster DNS from CoreDNS. Everything a pod talks to on the host (API server, S3, the local Hub) listens on
`NODE_IP`, an address of a host-only bridge, so no loopback address is ever handed to a pod.

iptables rules, the kubelet's ports and the containerd socket are machine-wide, so there is one real node per
machine: a second environment asking for one is refused while the first is up. Its paths are fixed and short
(unix socket paths are limited to 108 bytes); containerd's images outlive `down`, so a second `up` imports
nothing it already has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .images import PAUSE_IMAGE, ensure_pause_archive
from .processes import is_running, stop_process

NODE_NAME = "tweetbot-node"
NODE_LABEL = "tweetbot.dev/real-node"
HOST_LINK = "tweetbot0"  # a bridge with no ports: a stable host address that is not loopback
NODE_IP = "172.31.254.1"
POD_BRIDGE = "tbcni0"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"

ROOT = Path("/var/lib/tweetbot-node")
RUN = Path("/run/tweetbot-node")
SOCKET = RUN / "containerd.sock"
OWNER = RUN / "owner"
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins

# What the node (and the tests) need from Debian, by the command that shows it is there.
DEBIAN_PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "gcc": "gcc",
    "buildah": "buildah",
    "mmdebstrap": "mmdebstrap",
    "openssl": "openssl",  # Kueue's self-signed certificates in the tests (kueue.py)
    "shellcheck": "shellcheck",  # actionlint's check of the workflows' scripts (tests/test_release.py)
}


def missing_packages() -> list[str]:
    return sorted({package for command, package in DEBIAN_PACKAGES.items()
                   if not (Path(command).exists() if command.startswith("/") else shutil.which(command))})


def install_packages(log=print) -> None:
    """Install the Debian packages the real node and the image builds need (root and apt-get only)."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"the real node needs the Debian packages {' '.join(missing)}: install them as root")
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ctr(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["ctr", "--address", str(SOCKET), "--namespace", "k8s.io", *args], capture_output=True,
                          text=True, check=check, timeout=timeout)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


# --- configuration, as data ------------------------------------------------------------------------


def containerd_config() -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{ROOT / 'containerd'}"
state = "{RUN / 'containerd'}"
[grpc]
  address = "{SOCKET}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine refuses a negative oom_score_adj even to root; runc would fail every sandbox.
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{ROOT / 'cni'}"
"""


def cni_config() -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": "tweetbot",
        "plugins": [
            {"type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": str(RUN / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config() -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "cgroupDriver": "cgroupfs",  # cgroup v1 without systemd here
        "failSwapOn": False,
        "failCgroupV1": False,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},  # bound to the host-only NODE_IP
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(ROOT / "resolv.conf"),
        "serializeImagePulls": False,
        # A development machine's disk is shared with image builds: never evict or collect images for space.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "containerRuntimeEndpoint": f"unix://{SOCKET}",
        "podLogsDir": str(ROOT / "pod-logs"),
    }


def kube_proxy_config(kubeconfig: Path) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {"maxPerCore": 0},  # leave the host's conntrack table size alone
    }


def corefile(kubeconfig: Path) -> str:
    return f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
}}
"""


def apiserver_patches() -> tuple[dict, list[dict]]:
    """kwokctl options and kube-apiserver arguments so pods reach the API server through the `kubernetes`
    Service: served on every address, advertised on NODE_IP, its certificate valid for the Service IP."""
    options = {"kubeApiserverCertSANs": [NODE_IP, API_SERVICE_IP]}
    patches = [{"name": "kube-apiserver", "extraArgs": [
        {"key": "bind-address", "value": "0.0.0.0", "override": True},
        {"key": "advertise-address", "value": NODE_IP},
        {"key": "service-cluster-ip-range", "value": SERVICE_CIDR},
        {"key": "kubelet-preferred-address-types", "value": "InternalIP"},  # logs and exec: no DNS name for the node
    ]}, {"name": "kube-controller-manager", "extraArgs": [
        {"key": "service-cluster-ip-range", "value": SERVICE_CIDR},
    ]}]
    return options, patches


# --- the host network ------------------------------------------------------------------------------


def ensure_host_link() -> None:
    if _sh("ip", "link", "show", HOST_LINK, check=False).returncode != 0:
        _sh("ip", "link", "add", HOST_LINK, "type", "bridge")
    if NODE_IP not in _sh("ip", "-o", "addr", "show", HOST_LINK).stdout:
        _sh("ip", "addr", "add", f"{NODE_IP}/32", "dev", HOST_LINK)
    _sh("ip", "link", "set", HOST_LINK, "up")
    # Service traffic is DNATed on the host and forwarded back onto the pod bridge.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not bridge_nf.exists():
        _sh("modprobe", "br_netfilter", check=False)
    bridge_nf.write_text("1")


def load_image(archive: Path, ref: str, log=print) -> None:
    """Import an OCI archive into the node's containerd unless it has `ref` already."""
    if ref in ctr("images", "list", "--quiet").stdout.split():
        return
    started = time.monotonic()
    ctr("images", "import", str(archive))  # unpacked now, not by the first pod that uses it
    names = ctr("images", "list", "--quiet").stdout.split()
    if ref not in names:
        raise RuntimeError(f"importing {archive} did not give the image {ref} (containerd has {names})")
    log(f"loaded {ref} into the node in {time.monotonic() - started:.0f}s")
    # Earlier builds of the same image (GBs each for the trainer) are nothing a pod of this node will run again.
    repository = ref.rsplit(":", 1)[0]
    older = [name for name in names if name != ref and name.rsplit(":", 1)[0] == repository]
    if older:
        ctr("images", "remove", "--sync", *older, check=False)
        log(f"removed {', '.join(older)} from the node")


def kill_container(container_id: str) -> None:
    """SIGKILL a container's processes, as a node crash or the OOM killer would (`containerd://<id>` or `<id>`)."""
    ctr("tasks", "kill", "--all", "--signal", "SIGKILL", container_id.removeprefix("containerd://"))


# --- the node ----------------------------------------------------------------------------------------


@dataclass
class RealNode:
    """The real node of the environment under `home` (logs and its kubeconfig live there)."""

    home: Path
    bin_dir: Path
    kubeconfig: Path
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.home / "node"

    def start(self, log=print, timeout: float = 120) -> None:
        self._claim()
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (ROOT / "cni", ROOT / "kubelet", RUN):
            path.mkdir(parents=True, exist_ok=True)
        ensure_host_link()
        (ROOT / "containerd.toml").write_text(containerd_config())
        (ROOT / "cni" / "10-tweetbot.conflist").write_text(json.dumps(cni_config(), indent=2))
        # Pods ask CoreDNS; nothing outside the cluster is resolvable here.
        (ROOT / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config()))
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(self.kubeconfig)))
        (self.dir / "Corefile").write_text(corefile(self.kubeconfig))

        self._spawn("containerd", ["containerd", "--config", str(ROOT / "containerd.toml")])
        deadline = time.monotonic() + 30
        while ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or not is_running(self.pids["containerd"]):
                raise RuntimeError(f"containerd did not start; see {self.dir / 'containerd.log'}")
            time.sleep(0.2)
        load_image(ensure_pause_archive(log), PAUSE_IMAGE, log)
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(self.dir / "Corefile")])
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), "--config", str(self.dir / "kube-proxy.yaml")])
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), "--config", str(self.dir / "kubelet.yaml"),
            "--kubeconfig", str(self.kubeconfig), "--root-dir", str(ROOT / "kubelet"),
            "--cert-dir", str(ROOT / "kubelet" / "pki"), "--hostname-override", NODE_NAME, "--node-ip", NODE_IP,
            "--node-labels", f"{NODE_LABEL}=true",
        ])
        self._wait_ready(timeout)

    def _claim(self) -> None:
        try:
            owner = json.loads(OWNER.read_text())
        except (FileNotFoundError, ValueError):
            owner = None
        if owner and owner["home"] != str(self.home) and any(is_running(pid) for pid in owner["pids"].values()):
            raise RuntimeError(f"this machine's real node belongs to the environment in {owner['home']}: "
                               f"stop it first (tweetbot-dev down --home {owner['home']})")
        RUN.mkdir(parents=True, exist_ok=True)
        self._save_owner()

    def _save_owner(self) -> None:
        OWNER.write_text(json.dumps({"home": str(self.home), "pids": self.pids}))

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, "PATH": f"{self.bin_dir}:{os.environ['PATH']}"})
        self.pids[name] = process.pid
        self._save_owner()

    def _wait_ready(self, timeout: float) -> None:
        kubectl = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not is_running(pid):
                    raise RuntimeError(f"{name} exited; see {self.dir / (name + '.log')}")
            result = subprocess.run([*kubectl, "get", "node", NODE_NAME, "-o",
                                     "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
                                    capture_output=True, text=True)
            if result.stdout.strip() == "True":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {NODE_NAME} not Ready within {timeout:.0f}s; see {self.dir / 'kubelet.log'}")

    def is_running(self) -> bool:
        return bool(self.pids) and all(is_running(pid) for pid in self.pids.values())

    def stop(self) -> None:
        """Stop every pod's containers and the node's processes, and undo its network; keeps containerd's images."""
        try:
            owner = json.loads(OWNER.read_text())
        except (FileNotFoundError, ValueError):
            owner = None
        if owner is not None and owner["home"] != str(self.home):
            return  # another environment's node
        for name in ("kubelet", "kube-proxy", "coredns"):
            if name in self.pids:
                stop_process(self.pids[name], expect=name)
        if "containerd" in self.pids and is_running(self.pids["containerd"]):
            containers = ctr("containers", "list", "--quiet", check=False).stdout.split()
            for container in containers:
                ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
            for container in containers:
                for _ in range(50):  # the shim reports the killed task stopped a moment later
                    if container not in ctr("tasks", "list", "--quiet", check=False).stdout.split():
                        break
                    ctr("tasks", "delete", "--force", container, check=False)
                    time.sleep(0.1)
                ctr("containers", "delete", container, check=False)
            stop_process(self.pids["containerd"], expect="containerd")
        self.pids = {}
        _sh(str(self.bin_dir / "kube-proxy"), "--cleanup", check=False)
        for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
            if line.startswith("cni-"):
                _sh("ip", "netns", "delete", line.split()[0], check=False)
        _sh("ip", "link", "delete", POD_BRIDGE, check=False)
        _sh("ip", "link", "delete", HOST_LINK, check=False)
        for mount in sorted(_mounts_under((ROOT / "kubelet", RUN)), key=len, reverse=True):
            _sh("umount", "--lazy", mount, check=False)
        for path in (ROOT / "kubelet", ROOT / "pod-logs", RUN):
            shutil.rmtree(path, ignore_errors=True)


def _mounts_under(roots) -> list[str]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == str(root) or target.startswith(str(root) + "/") for root in roots):
            found.append(target)
    return found
