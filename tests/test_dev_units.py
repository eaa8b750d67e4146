"""Pure pieces of the dev tooling: pins, stamps, node shapes and generated settings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tweetbot_dev import binaries
from tweetbot_dev.cluster import GPU_RESOURCE, GPU_TAINT, fake_node, fake_nodes, kwokctl_config
from tweetbot_dev.devenv import DevEnvironment


def test_kubernetes_ldflags_carry_the_release():
    flags = binaries.kubernetes_ldflags("v1.34.4")
    assert "-X k8s.io/component-base/version.gitVersion=v1.34.4" in flags
    assert "gitMajor=1 " in flags and "gitMinor=34 " in flags


def test_build_stamp_follows_toolchain_and_pins(monkeypatch):
    first = binaries.build_stamp("go1.26.8")
    assert first == binaries.build_stamp("go1.26.8")
    assert first != binaries.build_stamp("go1.27.0")
    monkeypatch.setattr(binaries, "GO_TOOLS", binaries.GO_TOOLS[:-1])
    assert first != binaries.build_stamp("go1.26.8")


def test_the_checkers_have_a_stamp_of_their_own(monkeypatch):
    control_plane, checks = binaries.build_stamp("go1.26.8"), binaries.checks_stamp("go1.26.8")
    assert checks != binaries.checks_stamp("go1.27.0")
    monkeypatch.setattr(binaries, "CHECK_TOOLS", ())
    assert checks != binaries.checks_stamp("go1.26.8")
    assert control_plane == binaries.build_stamp("go1.26.8")  # a new checker relinks no control plane


def test_every_pin_is_exact():
    for tool in (*binaries.GO_TOOLS, *binaries.CHECK_TOOLS):
        assert tool.version.startswith("v") and "latest" not in tool.version
    go_mod = (binaries.CONTROLPLANE_MODULE / "go.mod").read_text()
    assert f"k8s.io/kubernetes {binaries.KUBERNETES_VERSION}" in go_mod
    assert f"go.etcd.io/etcd/server/v3 {binaries.ETCD_VERSION}" in go_mod
    staging_minor = "v0." + binaries.KUBERNETES_VERSION.split(".", 1)[1]
    replaces = [line for line in go_mod.splitlines() if "=>" in line]
    assert replaces and all(line.strip().endswith(staging_minor) for line in replaces)
    assert "=>" not in (binaries.DASHBOARDCHECK_MODULE / "go.mod").read_text()


def test_gpu_nodes_advertise_gpus_and_are_tainted():
    gpu = fake_node("g", gpus=4)
    assert gpu["status"]["allocatable"][GPU_RESOURCE] == "4"
    assert gpu["spec"]["taints"] == [GPU_TAINT]
    cpu = fake_node("c")
    assert GPU_RESOURCE not in cpu["status"]["capacity"] and "taints" not in cpu["spec"]
    names = [node["metadata"]["name"] for node in fake_nodes(cpu_nodes=1, gpu_nodes=2)]
    assert names == ["kwok-cpu-0", "kwok-gpu-0", "kwok-gpu-1"]


def test_kwokctl_uses_local_binaries_on_loopback():
    options = kwokctl_config(Path("/opt/bin"))["options"]
    assert options["bindAddress"] == "127.0.0.1"
    assert options["runtime"] == "binary"
    binary_options = {key: value for key, value in options.items() if key.endswith("Binary")}
    assert binary_options and all(value.startswith("/opt/bin/") for value in binary_options.values())


def test_extra_kwokctl_options_and_patches_keep_our_own():
    extra_patch = {"name": "kube-controller-manager", "extraArgs": [{"key": "kube-api-qps", "value": "500"}]}
    config = kwokctl_config(Path("/opt/bin"), {"kubeAuditPolicy": "/tmp/policy.yaml"}, [extra_patch])
    assert config["options"]["kubeAuditPolicy"] == "/tmp/policy.yaml"
    assert config["options"]["bindAddress"] == "127.0.0.1"
    assert [patch["name"] for patch in config["componentsPatches"]] == ["kwok-controller", "kube-controller-manager"]


def test_shell_exports_are_quoted(tmp_path):
    env = DevEnvironment(home=tmp_path / "with space", bin_dir=Path("/opt/bin"), s3_port=9000,
                         s3_access_key="key", s3_secret_key="it's")
    exports = env.shell_exports()
    assert "export AWS_SECRET_ACCESS_KEY='it'\"'\"'s'\n" in exports
    assert f"export KUBECONFIG='{tmp_path}/with space/kwok/kubeconfig'\n" in exports
    assert "export AWS_ENDPOINT_URL=http://127.0.0.1:9000\n" in exports
    assert "export PATH=/opt/bin:" in exports


def test_state_round_trips_and_is_private(tmp_path):
    env = DevEnvironment(home=tmp_path, bin_dir=Path("/opt/bin"), s3_port=9000, s3_access_key="k",
                         s3_secret_key="s", s3_pid=123, timings={"cluster_start_seconds": 3.5})
    env.save()
    assert (tmp_path / "state.json").stat().st_mode & 0o077 == 0
    assert DevEnvironment.load(tmp_path) == env
    assert DevEnvironment.load(tmp_path / "missing") is None


def test_benchmark_results_become_the_readme_table():
    from tweetbot_dev.bench import markdown_table
    from tweetbot_dev.bench_operator import operator_rows

    cores = {"kube-apiserver": 0.9, "etcd": 0.2, "bench": 0.3}
    run = {"baseline": {"all_jobs_seconds": 10.0, "p50_ms": 100.0, "p99_ms": 200.0, "requests_per_bot": 1.0,
                        "first_jobs_cores": cores},
           "bots_alone": {"all_created_seconds": 3.0, "first_jobs_cores": cores},
           "minimal_controller": {"all_jobs_seconds": 11.0, "p50_ms": 110.0, "p99_ms": 250.0, "first_jobs_cores": cores},
           "operator": {"all_jobs_seconds": 12.0, "p50_ms": 150.0, "p99_ms": 300.0, "all_succeeded_seconds": 90.0,
                        "requests_per_bot": 9.0, "reconciles_per_bot": 4.0, "peak_rss_mb": 120, "idle_rss_mb": 70,
                        "cpu_seconds": 30.0, "first_jobs_cores": {**cores, "kube-apiserver": 1.1, "operator": 0.4}},
           "time_ratio": 1.2, "p99_ratio": 1.5}
    rows = operator_rows({"1000": run})
    table = markdown_table({"date": "2026-11-23", "machine": "2 cores", "seconds": 600}, rows)
    assert "| N=1000: all first Jobs (s) | 12.0 | 10.0 | 1.2x the time |" in table
    assert "| N=1000: create->Job p99 (ms) | 300.0 | 200.0 | 1.5x |" in table
    assert "| N=1000: the bots alone (s) | 3.0 | 10.0 | 0.3x the time |" in table
    assert "| N=1000: API server cores | 1.1 | 0.9 |  | until all first Jobs; every process: 2.00 vs 1.40 of 2 |" in table
    assert "| N=1000: minimal controller (s) | 11.0 | 10.0 | 1.1x the time | watch + one Job create per bot, nothing else: p50 110.0 ms, p99 250.0 ms |" in table
    assert table.count("\n| N=1000") == len(rows) == 9


def test_the_product_command_line_imports_no_tooling_and_offers_none():
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, tweetbot_operator.cli; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tweetbot_dev'))"],
        capture_output=True, text=True, check=True,
    )
    assert imported.stdout.strip() == "[]"
    repo = Path(__file__).resolve().parents[1]
    for source in [*(repo / "operator").rglob("*.py"), *(repo / "trainer").rglob("*.py")]:  # nor lazily
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [name for name in modules if name.split(".")[0] == "tweetbot_dev"], source
    usage = subprocess.run([Path(sys.executable).with_name("tweetbot"), "--help"], capture_output=True, text=True, check=True)
    assert usage.stdout.startswith("usage: tweetbot [-h] {operator} ...")


def test_tweetbot_dev_carries_the_tooling_verbs():
    usage = subprocess.run(
        [Path(sys.executable).with_name("tweetbot-dev"), "--help"], capture_output=True, text=True, check=True
    )
    assert usage.stdout.startswith("usage: tweetbot-dev [-h] {build,up,env,down,demo,bench,release} ...")
