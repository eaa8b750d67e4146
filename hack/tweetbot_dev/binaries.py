"""Build the pinned control-plane, kwok, helm, MinIO, CoreDNS, Kueue and actionlint binaries from Go modules,
once per machine, and, as a second set, the checkers the chart's tests run (promtool, dashboardcheck).

Binaries land in ``~/.cache/tweetbot/bin/<stamp>/``; the stamp hashes every pin, the Go wrapper module
and the Go toolchain version, so changing any of them builds a fresh set next to the old one. The checkers
have their own stamp: a new checker links a set of ~130 MB, not another ~1 GB of control plane.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"  # the etcd that Kubernetes v1.34 is released with (its go.mod)

CONTROLPLANE_MODULE = Path(__file__).resolve().parents[1] / "controlplane"
DASHBOARDCHECK_MODULE = Path(__file__).resolve().parents[1] / "dashboardcheck"


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

# The chart's checkers: `promtool check rules` for its PrometheusRule, and a strict read of its Grafana dashboards
# into the Grafana Foundation SDK's types (hack/dashboardcheck, a module of our own).
PROMTOOL = GoTool("github.com/prometheus/prometheus/cmd/promtool", "v0.316.0")
CHECK_TOOLS = (PROMTOOL,)
DASHBOARDCHECK = "dashboardcheck"

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


def checks_stamp(go: str) -> str:
    digest = hashlib.sha256()
    digest.update(go.encode())
    for tool in CHECK_TOOLS:
        digest.update(f"{tool.package}@{tool.version} {tool.ldflags}".encode())
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((DASHBOARDCHECK_MODULE / name).read_bytes())
    return f"checks-{digest.hexdigest()[:12]}"


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
    _install(GO_TOOLS, into, env, log)


def _install(tools: tuple[GoTool, ...], into: Path, env: dict[str, str], log) -> None:
    for tool in tools:
        _go(
            ["install", "-ldflags", f"-s -w {tool.ldflags}".strip(), f"{tool.package}@{tool.version}"],
            into,
            {**env, "GOBIN": str(into)},
            log,
        )


def build_checks(into: Path, log=print) -> None:
    into.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"}
    _go(["build", "-ldflags", "-s -w", "-o", str(into) + "/", "."], DASHBOARDCHECK_MODULE, env, log)
    _install(CHECK_TOOLS, into, env, log)


def ensure_binaries(log=print) -> Path:
    """Return the directory holding every pinned binary, building it first if this machine lacks it."""
    return _ensure(build_stamp, build, BINARIES, "the local control plane binaries (first time on this machine: ~15 min)", log)


def ensure_check_tools(log=print) -> Path:
    """Return the directory holding promtool and dashboardcheck, building them first if this machine lacks them."""
    return _ensure(checks_stamp, build_checks, (DASHBOARDCHECK, *(tool.binary for tool in CHECK_TOOLS)),
                   "the chart's checkers (first time on this machine: ~10 min)", log)


def _ensure(stamp: Callable[[str], str], build_into: Callable[[Path, Callable], None], binaries: tuple[str, ...],
            what: str, log) -> Path:
    if shutil.which("go") is None:
        raise RuntimeError("Go (1.24 or newer) is needed to build the local control plane: install it first")
    root = cache_root() / "bin"
    final = root / stamp(go_version())
    if _complete(final, binaries):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits for the first build, then reuses it
        if _complete(final, binaries):
            return final
        log(f"building {what} into {final}")
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        started = time.monotonic()
        build_into(staging, log)
        missing = [name for name in binaries if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"build finished without {', '.join(missing)}")
        staging.rename(final)
        log(f"built in {time.monotonic() - started:.0f}s")
    return final


def _complete(directory: Path, binaries: tuple[str, ...] = BINARIES) -> bool:
    return all((directory / name).is_file() for name in binaries)
