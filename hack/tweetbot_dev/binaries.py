"""Build the pinned control-plane, kwok, helm, MinIO, CoreDNS, Kueue and actionlint binaries from Go modules, once
per machine.

Binaries land in ``~/.cache/tweetbot/bin/<stamp>/``; the stamp hashes every pin, the Go wrapper module
and the Go toolchain version, so changing any of them builds a fresh set next to the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"  # the etcd that Kubernetes v1.34 is released with (its go.mod)

CONTROLPLANE_MODULE = Path(__file__).resolve().parents[1] / "controlplane"


@dataclass(frozen=True)
class GoTool:
    """A binary `go install`ed from a module at a pinned version."""

    package: str
    version: str
    ldflags: str = ""

    @property
    def binary(self) -> str:
        return self.package.rstrip("/").rsplit("/", 1)[-1]


# An admission queue for the tests of queued and gang-scheduled training (kueue.py).
KUEUE = GoTool("sigs.k8s.io/kueue/cmd/kueue", "v0.17.0")

# Modules without replace directives install straight from the proxy at a pinned version.
GO_TOOLS = (
    GoTool("sigs.k8s.io/kwok/cmd/kwok", "v0.7.0"),
    GoTool("sigs.k8s.io/kwok/cmd/kwokctl", "v0.7.0"),
    GoTool("helm.sh/helm/v3/cmd/helm", "v3.19.0", "-X helm.sh/helm/v3/internal/version.version=v3.19.0"),
    # MinIO stopped tagging Go-module versions; this pseudo-version is its last published commit.
    GoTool("github.com/minio/minio", "v0.0.0-20260212201848-7aac2a2c5b7c"),
    # Cluster DNS for the real node's pods.
    GoTool("github.com/coredns/coredns", "v1.15.0"),
    KUEUE,
    # The linter of the GitHub workflows (tests/test_release.py); it runs shellcheck on their scripts.
    GoTool("github.com/rhysd/actionlint/cmd/actionlint", "v1.7.12"),
)

# Built from the wrapper module in hack/controlplane (k8s.io/kubernetes needs its replaces).
CONTROLPLANE_PACKAGES = (
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "k8s.io/kubernetes/cmd/kube-scheduler",
    "k8s.io/kubernetes/cmd/kubectl",
    # The real node: a kubelet and kube-proxy of the same version beside the kwok nodes.
    "k8s.io/kubernetes/cmd/kubelet",
    "k8s.io/kubernetes/cmd/kube-proxy",
    "./etcd",
)

BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
    "etcd",
) + tuple(
    tool.binary for tool in GO_TOOLS
)


def kubernetes_ldflags(version: str = KUBERNETES_VERSION) -> str:
    """The -X flags Kubernetes' own build sets, so each binary reports its real version."""
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return " ".join(
        f"-X {pkg}.{name}={value}"
        for name, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        )
    )


def cache_root() -> Path:
    base = os.environ.get("TWEETBOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tweetbot"
    )
    return Path(base)


def go_version() -> str:
    return subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()


def build_stamp(go: str) -> str:
    """Everything that decides the bytes of the binaries, hashed."""
    digest = hashlib.sha256()
    digest.update(go.encode())
    for tool in GO_TOOLS:
        digest.update(f"{tool.package}@{tool.version} {tool.ldflags}".encode())
    digest.update(kubernetes_ldflags().encode())
    for name in ("go.mod", "go.sum", "etcd/main.go"):
        digest.update((CONTROLPLANE_MODULE / name).read_bytes())
    return f"k8s-{KUBERNETES_VERSION}-{digest.hexdigest()[:12]}"


def _go(args: list[str], cwd: Path, env: dict[str, str], log) -> None:
    log(f"$ go {' '.join(args)}")
    started = time.monotonic()
    subprocess.run(["go", *args], cwd=cwd, env=env, check=True, stdout=sys.stderr)
    log(f"  ({time.monotonic() - started:.0f}s)")


def build(into: Path, log=print) -> None:
    """Build every binary into the directory `into` (which must be empty or new)."""
    into.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"}
    _go(
        ["build", "-ldflags", f"-s -w {kubernetes_ldflags()}", "-o", str(into) + "/", *CONTROLPLANE_PACKAGES],
        CONTROLPLANE_MODULE,
        env,
        log,
    )
    for tool in GO_TOOLS:
        _go(
            ["install", "-ldflags", f"-s -w {tool.ldflags}".strip(), f"{tool.package}@{tool.version}"],
            into,
            {**env, "GOBIN": str(into)},
            log,
        )


def ensure_binaries(log=print) -> Path:
    """Return the directory holding every pinned binary, building it first if this machine lacks it."""
    if shutil.which("go") is None:
        raise RuntimeError("Go (1.24 or newer) is needed to build the local control plane: install it first")
    root = cache_root() / "bin"
    final = root / build_stamp(go_version())
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits for the first build, then reuses it
        if _complete(final):
            return final
        log(f"building the local control plane binaries into {final} (first time on this machine: ~15 min)")
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        started = time.monotonic()
        build(staging, log)
        missing = [name for name in BINARIES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"build finished without {', '.join(missing)}")
        staging.rename(final)
        log(f"built in {time.monotonic() - started:.0f}s")
    return final


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in BINARIES)
