"""The Helm chart on a real control plane of its own: lint, render, install, least-privilege RBAC proven by
running the operator with the chart's ServiceAccount token, upgrade, uninstall."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from tweetbot_dev.binaries import cache_root
from tweetbot_dev.cluster import service_account_kubeconfig
from tweetbot_dev.devenv import DevEnvironment
from tweetbot_dev.operator_process import OperatorProcess, play_container
from tweetbot_dev.polling import wait_for
from tweetbot_operator.spec import SECRET_OPT_IN_LABEL
from tweetbot_operator.stages import desired_job
from tweetbot_operator.settings import Settings
from tweetbot_trainer.contract import RUN_LABEL, STAGE_LABEL, HandleStats, StageResult

pytestmark = pytest.mark.cluster

OPT_IN = {SECRET_OPT_IN_LABEL: "true"}
STAGE_BOT = {"metadata": {"name": "b", "namespace": "bots", "uid": "u"},
             "spec": {"handles": ["a"], "source": {"x": {}}, "output": {"s3": {"bucket": "bots"}}}}
REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "tweetbot-operator"
RELEASE, RELEASE_NS, BOTS_NS = "tb", "tweetbot-system", "bots"
CRD_NAME = "tweetbots.huggingtweets.dev"


@pytest.fixture(scope="module")
def cluster():
    """A cluster of its own: the chart owns the CRD here, which other tests apply by hand."""
    runs = cache_root() / "test-runs"
    runs.mkdir(parents=True, exist_ok=True)
    env = DevEnvironment.up(Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-chart-", dir=runs)), log=print, owner_pid=os.getpid())
    yield env
    env.down()


def run(env: DevEnvironment, tool: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(env.bin_dir / tool), "--kubeconfig", str(env.kubeconfig), *args],
                            input=input, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{tool} {' '.join(args)}:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def api(cluster):
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


def test_lint_and_render_for_the_pinned_kubernetes(cluster):
    run(cluster, "helm", "lint", "--strict", str(CHART))
    for values in ([], ["--set", "watchNamespaces={bots,more}", "--set", "metrics.serviceMonitor.enabled=false"]):
        rendered = run(cluster, "helm", "template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                       "--kube-version", "v1.34.4", *values).stdout
        kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered) if doc)
        assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
        # The operator's (CRDs, and everything else when cluster-wide) and the view and edit roles for people.
        assert ("Role" in kinds) == bool(values) and kinds.count("ClusterRole") == (3 if values else 4)
        accounts = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "ServiceAccount"]
        trainer_accounts = [a for a in accounts if a["metadata"]["name"] == "tweetbot-trainer"]
        assert sorted(a["metadata"]["namespace"] for a in trainer_accounts) == (["bots", "more"] if values else [])
        assert all(a["automountServiceAccountToken"] is False for a in trainer_accounts)
    refused = run(cluster, "helm", "template", RELEASE, str(CHART), "--set", "logFormat=xml", check=False)
    assert refused.returncode != 0 and "value must be one of 'json', 'plain'" in refused.stderr


def test_network_policies_deny_by_default_and_select_the_pods_they_guard(cluster):
    rendered = run(cluster, "helm", "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--kube-version", "v1.34.4",
                   "--set", "watchNamespaces={bots,more}").stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    policies = {(doc["metadata"]["namespace"], doc["metadata"]["name"]): doc for doc in documents if doc["kind"] == "NetworkPolicy"}
    assert sorted(policies) == [("bots", "tweetbot-stages"), ("bots", "tweetbot-training-gangs"), ("more", "tweetbot-stages"),
                                ("more", "tweetbot-training-gangs"), (RELEASE_NS, f"{RELEASE}-tweetbot-operator")]
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    operator_policy = policies[(RELEASE_NS, f"{RELEASE}-tweetbot-operator")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert operator_policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    stage_pod = desired_job(STAGE_BOT, "abc123", "train", Settings())["spec"]["template"]["metadata"]["labels"]
    for namespace in ("bots", "more"):
        spec = policies[(namespace, "tweetbot-stages")]["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= stage_pod.items()
        assert spec["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in spec  # nothing may connect in
        blocks = [peer["ipBlock"] for rule in spec["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
        assert blocks and all("169.254.0.0/16" in block["except"] for block in blocks)  # no cloud metadata
        # A multi-node training's pods reach each other and only each other; scrape and publish pods are not among them.
        gang = policies[(namespace, "tweetbot-training-gangs")]["spec"]
        train_only = gang["podSelector"]["matchLabels"]
        assert train_only.items() <= stage_pod.items()
        assert not train_only.items() <= desired_job(STAGE_BOT, "abc123", "scrape", Settings())["spec"]["template"]["metadata"]["labels"].items()
        assert [peer["podSelector"]["matchLabels"] for rule in gang["ingress"] + gang["egress"] for peer in rule["from" if "from" in rule else "to"]] == [train_only] * 2
    off = run(cluster, "helm", "template", RELEASE, str(CHART), "--kube-version", "v1.34.4", "--set", "networkPolicy.enabled=false").stdout
    assert "NetworkPolicy" not in off


def test_every_rendered_object_and_example_is_accepted_by_the_api_server(cluster):
    # The `helm test` pod names the operator's ServiceAccount, which a dry run does not create: it is checked
    # once the chart is installed.
    rendered = run(cluster, "helm", "template", RELEASE, str(CHART), "--namespace", "default", "--kube-version", "v1.34.4",
                   "--skip-tests").stdout
    run(cluster, "kubectl", "apply", "--dry-run=server", "-f", "-", input=rendered)


def test_install_creates_everything(cluster, api):
    run(cluster, "helm", "install", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--create-namespace",
        "--set", "trainer.image=tweetbot-trainer:test")
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAME)
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    apps = client.AppsV1Api(api)
    deployment = apps.read_namespaced_deployment(f"{RELEASE}-tweetbot-operator", RELEASE_NS)
    assert deployment.spec.strategy.type == "Recreate"
    container = deployment.spec.template.spec.containers[0]
    assert container.security_context.read_only_root_filesystem and container.security_context.capabilities.drop == ["ALL"]
    env = {item.name: item.value for item in container.env}
    assert not env["TWEETBOT_TRAINER_SERVICE_ACCOUNT"]  # cluster-wide: each namespace's default account
    run(cluster, "kubectl", "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    run(cluster, "kubectl", "apply", "--dry-run=server", "-n", "default", "-f", str(REPO / "examples"))
    run(cluster, "kubectl", "apply", "--dry-run=server", "-n", RELEASE_NS, "-f", "-", input=hook_manifest(cluster))


def hook_manifest(cluster) -> str:
    return run(cluster, "helm", "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--kube-version", "v1.34.4",
               "--show-only", "templates/tests/test-operator.yaml").stdout


def test_the_built_in_view_edit_and_admin_roles_reach_tweetbots(cluster, api):
    """The chart's aggregated ClusterRoles: a namespace's viewers read its bots, its editors and admins also
    write them, without anyone writing RBAC for TweetBots."""
    client.CoreV1Api(api).create_namespace({"metadata": {"name": "team"}})
    rbac = client.RbacAuthorizationV1Api(api)
    for user, role in (("viewer", "view"), ("editor", "edit"), ("admin", "admin")):
        rbac.create_namespaced_role_binding("team", {
            "metadata": {"name": user}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})

    def can(user: str, verb: str, subresource: str = "", namespace: str = "team") -> bool:
        args = [f"--subresource={subresource}"] if subresource else []
        return run(cluster, "kubectl", "auth", "can-i", verb, "tweetbots.huggingtweets.dev", *args, "-n", namespace,
                   f"--as={user}", check=False).stdout.strip() == "yes"

    # The aggregation controller copies the rules into the built-in roles shortly after the install.
    wait_for(lambda: can("viewer", "list") and can("editor", "create") and can("admin", "delete"),
             timeout=60, what="the built-in roles to take in the chart's rules")
    for user in ("viewer", "editor", "admin"):
        assert can(user, "get") and can(user, "watch") and can(user, "get", "status")
        assert not can(user, "patch", "status")  # the operator's alone
        assert not can(user, "get", namespace="other")  # only where the user is bound
    for user in ("editor", "admin"):
        for verb in ("update", "patch", "deletecollection"):
            assert can(user, verb), f"{user} {verb}"
    assert not can("viewer", "create") and not can("viewer", "delete")


def operator_kubeconfig(cluster, api, directory: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, as the operator's pod would."""
    return service_account_kubeconfig(client.CoreV1Api(api), cluster.kubeconfig, RELEASE_NS,
                                      f"{RELEASE}-tweetbot-operator", directory / "operator-kubeconfig", seconds=3600)


def test_the_operator_with_only_the_charts_rights_drives_a_bot_to_succeeded(cluster, api, tmp_path):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": BOTS_NS}})
    core.create_namespaced_secret(BOTS_NS, {"metadata": {"name": "x-api", "labels": OPT_IN}, "stringData": {"token": "t"}})
    operator = OperatorProcess(cluster, tmp_path, kubeconfig=operator_kubeconfig(cluster, api, tmp_path))
    operator.start()
    try:
        # `helm test`'s check, run here as its pod would run it (no kubelet runs pods in this cluster): as the
        # operator's ServiceAccount, against the real API server and the running operator's health endpoint.
        hook = next(doc for doc in yaml.safe_load_all(hook_manifest(cluster)) if doc)["spec"]["containers"][0]
        hook_env = {key: value for key, value in os.environ.items() if key != "KUBERNETES_SERVICE_HOST"}
        hook_env.update({item["name"]: item["value"] for item in hook["env"]})
        hook_env.update({"KUBECONFIG": str(tmp_path / "operator-kubeconfig"), "TWEETBOT_HEALTH_URL": operator.health_url})
        checked = subprocess.run([sys.executable, *hook["command"][1:]], env=hook_env, capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0 and checked.stdout.count("ok: ") == 2, checked.stdout + checked.stderr
        custom.create_namespaced_custom_object("huggingtweets.dev", "v1alpha1", BOTS_NS, "tweetbots", {
            "apiVersion": "huggingtweets.dev/v1alpha1", "kind": "TweetBot", "metadata": {"name": "chartbot"},
            "spec": {"handles": ["a"], "source": {"x": {"bearerTokenSecretRef": {"name": "x-api"}}},
                     "output": {"s3": {"bucket": "bots"}}, "resources": {"gpus": 1}}})
        stats = [HandleStats("a", 10, 1, 2, 7)]
        for stage, fields in (("scrape", {"data": stats}), ("train", {"metrics": {"evalLoss": 3.0}}), ("publish", {})):
            job = wait_for(lambda: (batch.list_namespaced_job(BOTS_NS, label_selector=f"{STAGE_LABEL}={stage}").items or [None])[0],
                           what=f"the {stage} Job")
            play_container(core, BOTS_NS, job.metadata.name,
                           StageResult(stage=stage, run_id=job.metadata.labels[RUN_LABEL], **fields))

        def succeeded():
            bot = custom.get_namespaced_custom_object("huggingtweets.dev", "v1alpha1", BOTS_NS, "tweetbots", "chartbot")
            return (bot.get("status") or {}).get("phase") == "Succeeded"

        wait_for(succeeded, timeout=60, what="the bot to succeed")
        log = operator.log.read_text()
        assert not re.search(r"\b403\b", log) and "Forbidden" not in log, log[-3000:]  # \b: not inside a timestamp
    finally:
        operator.stop()

    # What the chart does not grant is refused by the API server, for the same identity.
    as_operator = config.new_client_from_config(config_file=str(tmp_path / "operator-kubeconfig"))
    with pytest.raises(client.ApiException) as refused:
        client.CoreV1Api(as_operator).list_namespaced_secret(BOTS_NS)
    assert refused.value.status == 403
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(as_operator).delete_namespaced_custom_object(
            "huggingtweets.dev", "v1alpha1", BOTS_NS, "tweetbots", "chartbot")
    assert refused.value.status == 403
    for verb, resource, *args in (("get", "secrets"), ("create", "jobs"), ("patch", "tweetbots", "--subresource=status"),
                                  ("patch", "services")):
        assert run(cluster, "kubectl", "auth", "can-i", verb, resource, *args, "-n", BOTS_NS,
                   f"--as=system:serviceaccount:{RELEASE_NS}:{RELEASE}-tweetbot-operator").stdout.strip() == "yes", resource
    for verb, resource in (("update", "tweetbots"), ("create", "deployments"), ("list", "secrets")):
        answer = run(cluster, "kubectl", "auth", "can-i", verb, resource, "-n", BOTS_NS,
                     f"--as=system:serviceaccount:{RELEASE_NS}:{RELEASE}-tweetbot-operator", check=False).stdout.strip()
        assert answer == "no", f"{verb} {resource}"


def test_upgrade_changes_the_crd_and_uninstall_keeps_the_tweetbots(cluster, api):
    extensions = client.ApiextensionsV1Api(api)
    run(cluster, "helm", "upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values", "--set", "crds.keep=false")
    assert "helm.sh/resource-policy" not in (extensions.read_custom_resource_definition(CRD_NAME).metadata.annotations or {})
    run(cluster, "helm", "upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values", "--set", "crds.keep=true")
    assert extensions.read_custom_resource_definition(CRD_NAME).metadata.annotations["helm.sh/resource-policy"] == "keep"

    run(cluster, "helm", "uninstall", RELEASE, "--namespace", RELEASE_NS)
    apps = client.AppsV1Api(api)
    wait_for(lambda: not apps.list_namespaced_deployment(RELEASE_NS).items, what="the Deployment to go")
    assert extensions.read_custom_resource_definition(CRD_NAME)
    bots = client.CustomObjectsApi(api).list_namespaced_custom_object("huggingtweets.dev", "v1alpha1", BOTS_NS, "tweetbots")
    assert [bot["metadata"]["name"] for bot in bots["items"]] == ["chartbot"]
    assert json.dumps(bots).count('"phase": "Succeeded"') == 1
