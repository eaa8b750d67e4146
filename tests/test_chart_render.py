"""The Helm chart as rendered by the pinned helm, without a cluster: what the ecosystem expects of it (aggregated
roles, cloud identities on the ServiceAccounts, images at the appVersion, a ServiceMonitor Prometheus picks up,
Artifact Hub's metadata, a `helm test` hook) and that the hook's check itself tells a healthy install from a
broken one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tweetbot_dev.binaries import ensure_binaries

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "tweetbot-operator"
RELEASE, RELEASE_NS = "tb", "tweetbot-system"
FULLNAME = f"{RELEASE}-tweetbot-operator"
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
APP_VERSION = CHART_YAML["appVersion"]
CRD = yaml.safe_load((REPO / "crds" / "huggingtweets.dev_tweetbots.yaml").read_text())
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_binaries() / "helm"


def render(helm: Path, tmp_path: Path, values: dict | None = None, *args: str, check: bool = True):
    """The chart's documents (or, with check=False, the finished process) for these values."""
    command = [str(helm), "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--kube-version", "v1.34.4", *args]
    if values is not None:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        command += ["--values", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(documents: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = [doc for doc in documents if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
             and namespace in (None, doc["metadata"].get("namespace"))]
    assert len(found) == 1, f"{kind} {name}: {[doc['metadata']['name'] for doc in found]}"
    return found[0]


def env_of(deployment: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def grants(role: dict) -> set[tuple[str, str]]:
    return {(f"{group}/{resource}", verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# Aggregated ClusterRoles -----------------------------------------------------------------------------------------

def test_the_default_view_edit_and_admin_roles_reach_tweetbots(helm, tmp_path):
    documents = render(helm, tmp_path)
    view = one(documents, "ClusterRole", f"{FULLNAME}-view")
    edit = one(documents, "ClusterRole", f"{FULLNAME}-edit")
    reads = {(f"huggingtweets.dev/{resource}", verb) for resource in ("tweetbots", "tweetbots/status")
             for verb in ("get", "list", "watch")}
    writes = {("huggingtweets.dev/tweetbots", verb) for verb in ("create", "update", "patch", "delete", "deletecollection")}
    assert grants(view) == reads
    assert grants(edit) == reads | writes  # never the status, the finalizers or anything the operator alone does
    view_labels, edit_labels = view["metadata"]["labels"], edit["metadata"]["labels"]
    assert view_labels[f"{AGGREGATE}view"] == "true" and not any(f"{AGGREGATE}{r}" in view_labels for r in ("edit", "admin"))
    assert edit_labels[f"{AGGREGATE}edit"] == edit_labels[f"{AGGREGATE}admin"] == "true" and f"{AGGREGATE}view" not in edit_labels
    assert view_labels["app.kubernetes.io/instance"] == RELEASE  # the chart's own labels, like its other objects
    # Scoped to watched namespaces, people still need them; switched off, there are none.
    assert {f"{FULLNAME}-view", f"{FULLNAME}-edit"} <= {doc["metadata"]["name"] for doc in render(
        helm, tmp_path, {"watchNamespaces": ["bots"]}) if doc["kind"] == "ClusterRole"}
    off = render(helm, tmp_path, {"rbac": {"aggregateToDefaultRoles": False}})
    assert not [doc for doc in off if doc["kind"] == "ClusterRole" and any(
        key.startswith(AGGREGATE) for key in doc["metadata"]["labels"])]


# ServiceAccount annotations --------------------------------------------------------------------------------------

IRSA = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/tweetbot"}
GKE = {"iam.gke.io/gcp-service-account": "tweetbot@project.iam.gserviceaccount.com"}


def test_cloud_identities_go_on_the_operators_and_the_trainers_service_accounts(helm, tmp_path):
    documents = render(helm, tmp_path, {"watchNamespaces": ["bots", "more"], "serviceAccount": {"annotations": IRSA},
                                        "trainer": {"serviceAccount": {"annotations": {**IRSA, **GKE}}}})
    operator = one(documents, "ServiceAccount", FULLNAME, RELEASE_NS)
    assert operator["metadata"]["annotations"] == IRSA
    assert one(documents, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
    for namespace in ("bots", "more"):
        trainer = one(documents, "ServiceAccount", "tweetbot-trainer", namespace)
        assert trainer["metadata"]["annotations"] == {**IRSA, **GKE} and trainer["automountServiceAccountToken"] is False
    assert env_of(one(documents, "Deployment"))["TWEETBOT_TRAINER_SERVICE_ACCOUNT"] == "tweetbot-trainer"
    # None by default.
    assert all("annotations" not in doc["metadata"] for doc in render(helm, tmp_path, {"watchNamespaces": ["bots"]})
               if doc["kind"] == "ServiceAccount")


def test_trainer_annotations_with_no_account_to_carry_them_are_refused(helm, tmp_path):
    """Watching every namespace, stage pods run as each namespace's default account, which the chart does not
    own: annotations the chart cannot place are an error, not silently dropped."""
    for values in ({"trainer": {"serviceAccount": {"annotations": IRSA}}},
                   {"watchNamespaces": ["bots"], "trainer": {"serviceAccount": {"create": False, "annotations": IRSA}}}):
        refused = render(helm, tmp_path, values, check=False)
        assert refused.returncode != 0 and "trainer.serviceAccount.annotations" in refused.stderr, refused.stderr


# The trainer image ----------------------------------------------------------------------------------------------

def test_the_trainer_image_follows_the_app_version_like_the_operators(helm, tmp_path):
    deployment = one(render(helm, tmp_path), "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/huggingtweets/tweetbot-operator:{APP_VERSION}"
    assert env_of(deployment)["TWEETBOT_TRAINER_IMAGE"] == f"ghcr.io/huggingtweets/tweetbot-trainer:{APP_VERSION}"
    pinned = one(render(helm, tmp_path, {"trainer": {"image": {"repository": "registry.example/trainer", "tag": "1.2.3"}}}), "Deployment")
    assert env_of(pinned)["TWEETBOT_TRAINER_IMAGE"] == "registry.example/trainer:1.2.3"
    # The earlier form, one string, still works (Helm warns that it replaces a table).
    legacy = one(render(helm, tmp_path, None, "--set", "trainer.image=tweetbot-trainer:test"), "Deployment")
    assert env_of(legacy)["TWEETBOT_TRAINER_IMAGE"] == "tweetbot-trainer:test"
    for wrong in ({"image": {"repository": ""}}, {"image": {"tag": "x", "digest": "y"}}, {"image": ""}):
        assert render(helm, tmp_path, {"trainer": wrong}, check=False).returncode != 0, wrong


def test_bot_images_are_the_admins_choice_and_off_by_default(helm, tmp_path):
    """spec.podOverrides.<stage>.image runs code the admin did not choose with the bot's Secrets: only where the
    chart says so, and the operator reads the same setting (`Settings.from_env`)."""
    from tweetbot_operator.settings import Settings

    for values, allowed in ((None, False), ({"trainer": {"allowBotImages": True}}, True)):
        env = env_of(one(render(helm, tmp_path, values), "Deployment"))
        assert Settings.from_env(env).allow_bot_images is allowed
    assert render(helm, tmp_path, {"trainer": {"allowBotImages": "yes"}}, check=False).returncode != 0


def test_the_model_cache_reaches_the_operator_as_one_volume_source(helm, tmp_path):
    """trainer.modelCache: off by default; a node's directory (hostPath), or any volume, which wins. The operator
    reads the same setting (`Settings.from_env`) and mounts it into train pods."""
    from tweetbot_operator.settings import Settings

    def cache(values):
        return Settings.from_env(env_of(one(render(helm, tmp_path, {"trainer": {"modelCache": values}}), "Deployment"))).model_cache_volume

    assert Settings.from_env(env_of(one(render(helm, tmp_path), "Deployment"))).model_cache_volume is None
    assert cache({"hostPath": "/var/cache/tweetbot/models"}) == {
        "hostPath": {"path": "/var/cache/tweetbot/models", "type": "DirectoryOrCreate"}}
    shared = {"persistentVolumeClaim": {"claimName": "tweetbot-models"}}
    assert cache({"hostPath": "/var/cache/tweetbot/models", "volume": shared}) == shared
    for wrong in ({"hostPath": "relative/path"}, {"volume": {"nfs": {"server": "a", "path": "/"}, "hostPath": {"path": "/x"}}},
                  {"volume": {"nfs": "server:/models"}}, {"size": "100Gi"}):
        assert render(helm, tmp_path, {"trainer": {"modelCache": wrong}}, check=False).returncode != 0, wrong


# ServiceMonitor ---------------------------------------------------------------------------------------------------

def test_the_service_monitor_carries_prometheus_labels_and_selects_the_metrics_service(helm, tmp_path):
    documents = render(helm, tmp_path, {"metrics": {"serviceMonitor": {
        "enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}}}})
    monitor = one(documents, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    services = [doc for doc in documents if doc["kind"] == "Service"]
    selected = [service for service in services if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])]
    assert [service["metadata"]["name"] for service in selected] == [f"{FULLNAME}-metrics"]
    ports = {port["name"] for port in selected[0]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {"metrics"} and "metrics" in ports
    # The selector holds across upgrades: nothing in it changes with the chart's or the app's version.
    assert not {"app.kubernetes.io/version", "helm.sh/chart"} & monitor["spec"]["selector"]["matchLabels"].keys()
    assert "ServiceMonitor" not in {doc["kind"] for doc in render(helm, tmp_path)}


# Grafana dashboard and PrometheusRule -----------------------------------------------------------------------------

def test_the_dashboard_and_the_rules_are_rendered_only_when_enabled(helm, tmp_path):
    kinds = {doc["kind"] for doc in render(helm, tmp_path)}
    assert not {"ConfigMap", "PrometheusRule"} & kinds


def test_the_dashboard_configmap_carries_the_sidecar_s_label_in_the_namespace_asked_for(helm, tmp_path):
    dashboard = {"enabled": True}
    config_map = one(render(helm, tmp_path, {"grafana": {"dashboard": dashboard}}), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == RELEASE_NS
    assert json.loads(config_map["data"]["tweetbot.json"]) == json.loads((CHART / "dashboards" / "tweetbot.json").read_text())
    dashboard.update(label="dashboards", labelValue="tweetbot", namespace="monitoring", annotations={"grafana_folder": "TweetBot"})
    config_map = one(render(helm, tmp_path, {"grafana": {"dashboard": dashboard}}), "ConfigMap")
    assert config_map["metadata"]["labels"]["dashboards"] == "tweetbot" and "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "TweetBot"}


def test_the_prometheus_rule_carries_prometheus_labels_and_the_thresholds_asked_for(helm, tmp_path):
    rule = one(render(helm, tmp_path, {"prometheusRule": {
        "enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}, "severity": "critical",
        "trainingNoProgress": {"minutes": 45, "for": "10m"}}}), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    alerts = {item["alert"]: item for group in rule["spec"]["groups"] for item in group["rules"]}
    assert set(alerts) == {"TweetBotFailed", "TweetBotStalled", "TweetBotReconcileErrors", "TweetBotTrainingNoProgress"}
    assert {item["labels"]["severity"] for item in alerts.values()} == {"critical"}
    assert alerts["TweetBotTrainingNoProgress"]["for"] == "10m" and "> 45 * 60" in alerts["TweetBotTrainingNoProgress"]["expr"]
    assert "{{ $labels.namespace }}" in alerts["TweetBotStalled"]["annotations"]["description"]  # for Prometheus, not Helm
    assert render(helm, tmp_path, {"prometheusRule": {"enabled": True, "stalled": {"for": "soon"}}}, check=False).returncode != 0


# Artifact Hub -----------------------------------------------------------------------------------------------------

def test_artifact_hub_metadata_matches_what_the_chart_installs(helm, tmp_path):
    annotations = CHART_YAML["annotations"]
    assert annotations["artifacthub.io/license"] == "Apache-2.0" and "Apache License" in (REPO / "LICENSE").read_text()
    assert annotations["artifacthub.io/operator"] == "true"
    assert annotations["artifacthub.io/operatorCapabilities"] in (
        "Basic Install", "Seamless Upgrades", "Full Lifecycle", "Deep Insights", "Auto Pilot")
    crds = yaml.safe_load(annotations["artifacthub.io/crds"])
    names = CRD["spec"]["names"]
    assert [(crd["kind"], crd["name"], crd["version"]) for crd in crds] == [
        (names["kind"], CRD["metadata"]["name"], CRD["spec"]["versions"][0]["name"])]
    assert crds[0]["displayName"] == names["kind"]
    assert crds[0]["description"] == CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert links and all(link["name"] and link["url"].startswith("https://") for link in links)
    # The images it lists are the ones a default install runs.
    images = {image["name"]: image["image"] for image in yaml.safe_load(annotations["artifacthub.io/images"])}
    deployment = one(render(helm, tmp_path), "Deployment")
    assert images == {"tweetbot-operator": deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                      "tweetbot-trainer": env_of(deployment)["TWEETBOT_TRAINER_IMAGE"]}
    assert all(image.endswith(f":{APP_VERSION}") for image in images.values())


# helm test --------------------------------------------------------------------------------------------------------

def hook_pod(documents: list[dict]) -> dict:
    pods = [doc for doc in documents if doc["kind"] == "Pod"]
    assert len(pods) == 1, [doc["kind"] for doc in documents]
    return pods[0]


def test_helm_test_runs_a_check_pod_of_the_operators_image_like_the_operators_pod(helm, tmp_path):
    documents = render(helm, tmp_path)
    pod, deployment = hook_pod(documents), one(documents, "Deployment")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "before-hook-creation" in pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert pod["metadata"]["namespace"] == RELEASE_NS
    operator_pod = deployment["spec"]["template"]["spec"]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"] == operator_pod["securityContext"]  # non-root, uid 65532, seccomp
    (container,) = spec["containers"]
    assert container["image"] == operator_pod["containers"][0]["image"]
    assert container["securityContext"] == operator_pod["containers"][0]["securityContext"]
    assert container["command"][:2] == ["python", "-c"]
    # The operator's own account: it may list CustomResourceDefinitions, which is all the check reads.
    assert spec["serviceAccountName"] == operator_pod["serviceAccountName"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TWEETBOT_CRD"] == CRD["metadata"]["name"]
    assert env["TWEETBOT_HEALTH_URL"] == f"http://{FULLNAME}-metrics.{RELEASE_NS}.svc:8081/healthz"
    # ... which the Service serves, on the port the operator's health endpoint listens on.
    service = one(documents, "Service", f"{FULLNAME}-metrics")
    assert {"name": "health", "port": 8081, "targetPort": "health"} in service["spec"]["ports"]
    assert any(port["name"] == "health" and port["containerPort"] == 8081 for port in operator_pod["containers"][0]["ports"])
    # The check pod is not mistaken for the operator: no Service, Deployment or policy selects it ...
    labels = pod["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], labels)
    assert not selects(deployment["spec"]["selector"]["matchLabels"], labels)
    policy = one(documents, "NetworkPolicy", FULLNAME)
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    # ... and the operator's policy lets it reach the health port even when metrics are limited to some peers.
    limited = one(render(helm, tmp_path, {"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"x": "y"}}}]}}),
                  "NetworkPolicy", FULLNAME)
    assert any(peer.get("podSelector") and selects(peer["podSelector"]["matchLabels"], labels)
               and {"port": 8081, "protocol": "TCP"} in rule["ports"]
               for rule in limited["spec"]["ingress"] for peer in rule.get("from", []))


class _FakeServer(BaseHTTPRequestHandler):
    """Answers the hook's two questions: the CRD list (with the field selector) and /healthz."""

    crd_established = True
    health_status = 200
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        if self.path.startswith("/healthz"):
            self.send_response(self.health_status)
            self.end_headers()
            self.wfile.write(b"{}")
            return
        status = "True" if self.crd_established else "False"
        body = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinitionList", "metadata": {}, "items": [
            {**{key: CRD[key] for key in ("apiVersion", "kind", "metadata", "spec")},
             "status": {"conditions": [{"type": "Established", "status": status, "reason": "InitialNamesAccepted",
                                        "message": "", "lastTransitionTime": "2026-12-03T00:00:00Z"}]}}]}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def run_hook(pod: dict, kubeconfig: Path, health_url: str) -> subprocess.CompletedProcess:
    """The hook container's command, here, against `kubeconfig`'s API server and `health_url`."""
    container = pod["spec"]["containers"][0]
    env = {key: value for key, value in os.environ.items() if key != "KUBERNETES_SERVICE_HOST"}
    env.update({item["name"]: item["value"] for item in container["env"]})
    env.update({"KUBECONFIG": str(kubeconfig), "TWEETBOT_HEALTH_URL": health_url, "TWEETBOT_TEST_ATTEMPTS": "2"})
    return subprocess.run([sys.executable, *container["command"][1:]], env=env, capture_output=True, text=True, timeout=120)


def test_the_hook_passes_only_with_an_established_crd_and_a_healthy_operator(helm, tmp_path):
    pod = hook_pod(render(helm, tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": address}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        passed = run_hook(pod, kubeconfig, f"{address}/healthz")
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert any("fieldSelector=metadata.name" in path for path in _FakeServer.requests)
        _FakeServer.health_status = 500
        unhealthy = run_hook(pod, kubeconfig, f"{address}/healthz")
        assert unhealthy.returncode != 0 and "/healthz" in unhealthy.stdout, unhealthy.stdout + unhealthy.stderr
        _FakeServer.health_status, _FakeServer.crd_established = 200, False
        unestablished = run_hook(pod, kubeconfig, f"{address}/healthz")
        assert unestablished.returncode != 0 and CRD["metadata"]["name"] in unestablished.stdout
    finally:
        server.shutdown()
