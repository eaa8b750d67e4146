"""The local control plane is a real Kubernetes: the behaviours an operator depends on, observed."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tweetbot_dev.binaries import KUBERNETES_VERSION
from tweetbot_dev.cluster import GPU_NODE_LABEL, GPU_RESOURCE, GPU_TAINT
from tweetbot_dev.polling import wait_for

pytestmark = pytest.mark.cluster

GROUP = "probe.tweetbot.dev"


@pytest.fixture(scope="module")
def widget_crd(api_client):
    """A namespaced CRD with a structural schema and a status subresource."""
    extensions = client.ApiextensionsV1Api(api_client)
    name = f"widgets.{GROUP}"
    extensions.create_custom_resource_definition(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": GROUP,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                                },
                            }
                        },
                    }
                ],
            },
        }
    )

    def established():
        crd = extensions.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, what="the CRD to be Established")
    yield
    extensions.delete_custom_resource_definition(name)


def widgets(api_client):
    return client.CustomObjectsApi(api_client)


def test_binaries_report_the_pinned_release(api_client):
    assert client.VersionApi(api_client).get_code().git_version == KUBERNETES_VERSION


def test_unknown_fields_are_pruned(api_client, widget_crd, namespace):
    api = widgets(api_client)
    api.create_namespaced_custom_object(
        GROUP, "v1", namespace, "widgets",
        {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3, "colour": "red"}},
    )
    stored = api.get_namespaced_custom_object(GROUP, "v1", namespace, "widgets", "w")
    assert stored["spec"] == {"size": 3}

    # The same unknown field under strict validation is refused outright.
    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(
            GROUP, "v1", namespace, "widgets",
            {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"colour": "red"}},
            field_validation="Strict",
        )
    assert refused.value.status == 400
    assert "colour" in refused.value.body


def test_status_subresource_separates_spec_and_status(api_client, widget_crd, namespace):
    api = widgets(api_client)
    created = api.create_namespaced_custom_object(
        GROUP, "v1", namespace, "widgets",
        {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}},
    )
    # A write through /status that also tries to change spec: only status changes.
    after_status = api.patch_namespaced_custom_object_status(
        GROUP, "v1", namespace, "widgets", "w", {"spec": {"size": 99}, "status": {"phase": "Running"}}
    )
    assert after_status["spec"] == {"size": 1}
    assert after_status["status"] == {"phase": "Running"}
    assert after_status["metadata"]["generation"] == created["metadata"]["generation"]

    # And a write to the main resource cannot change status, while spec changes bump the generation.
    after_spec = api.patch_namespaced_custom_object(
        GROUP, "v1", namespace, "widgets", "w", {"spec": {"size": 2}, "status": {"phase": "Hacked"}}
    )
    assert after_spec["spec"] == {"size": 2}
    assert after_spec["status"] == {"phase": "Running"}
    assert after_spec["metadata"]["generation"] == created["metadata"]["generation"] + 1


def test_rbac_refuses_an_identity_without_rights(api_client, dev_env, namespace):
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    # A token signed by the apiserver's service-account key, as a pod would be given.
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token

    configuration = client.Configuration()
    configuration.host = api_client.configuration.host
    configuration.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(configuration) as as_nobody:
        assert client.AuthenticationV1Api(as_nobody).create_self_subject_review({}).status.user_info.username == (
            f"system:serviceaccount:{namespace}:nobody"
        )
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(as_nobody).list_namespaced_pod(namespace)
        assert refused.value.status == 403

        # Granting exactly that right makes the same call succeed: the refusal was RBAC, not a broken login.
        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.create_namespaced_role(
            namespace,
            {"metadata": {"name": "pod-reader"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "nobody-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
            },
        )

        def can_list():
            try:
                return client.CoreV1Api(as_nobody).list_namespaced_pod(namespace) is not None
            except ApiException as error:
                assert error.status == 403
                return False

        wait_for(can_list, timeout=30, what="the RoleBinding to take effect")
        with pytest.raises(ApiException) as still_refused:
            client.CoreV1Api(as_nobody).list_namespaced_secret(namespace)
        assert still_refused.value.status == 403


def job(name: str, resources: dict | None = None, tolerations: list | None = None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": tolerations or [],
                    "containers": [
                        {"name": "main", "image": "example.invalid/stage:1", "command": ["true"], "resources": resources or {}}
                    ],
                }
            },
        },
    }


def job_pods(core, namespace, name):
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def test_job_runs_to_complete_and_its_pods_are_garbage_collected(api_client, namespace):
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    batch.create_namespaced_job(namespace, job("scrape"))

    def complete():
        status = batch.read_namespaced_job_status("scrape", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    wait_for(complete, what="the Job to complete")
    pods = job_pods(core, namespace, "scrape")
    assert len(pods) == 1
    assert pods[0].status.phase == "Succeeded"
    assert pods[0].spec.node_name.startswith("kwok-cpu-")
    # The pod is owned by the Job: that link is what the garbage collector follows.
    assert [ref.kind for ref in pods[0].metadata.owner_references] == ["Job"]

    batch.delete_namespaced_job("scrape", namespace, propagation_policy="Background")
    wait_for(lambda: not job_pods(core, namespace, "scrape"), what="the garbage collector to delete the pods")


def test_gpu_pods_land_only_on_gpu_nodes(api_client, namespace):
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    gpu_nodes = {
        node.metadata.name
        for node in core.list_node(label_selector=f"{GPU_NODE_LABEL}=true").items
        if int(node.status.allocatable.get(GPU_RESOURCE, "0")) > 0
    }
    assert gpu_nodes, "the cluster has no GPU nodes"
    gpu = {"limits": {GPU_RESOURCE: "1"}}
    tolerate_gpu = [{"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]

    for i in range(3):
        batch.create_namespaced_job(namespace, job(f"train-{i}", gpu, tolerate_gpu))
    # A CPU job that tolerates the taint may go anywhere; one that does not must avoid GPU nodes.
    batch.create_namespaced_job(namespace, job("publish"))
    # Asking for a GPU without tolerating the taint fits nowhere.
    batch.create_namespaced_job(namespace, job("no-toleration", gpu))

    def scheduled(name):
        pods = job_pods(core, namespace, name)
        return pods[0].spec.node_name if pods and pods[0].spec.node_name else None

    for i in range(3):
        assert wait_for(lambda: scheduled(f"train-{i}"), what=f"train-{i} to be scheduled") in gpu_nodes
    assert wait_for(lambda: scheduled("publish"), what="publish to be scheduled") not in gpu_nodes

    def unschedulable():
        pods = job_pods(core, namespace, "no-toleration")
        conditions = pods[0].status.conditions or [] if pods else []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    wait_for(unschedulable, what="the scheduler to refuse the untolerated GPU pod")
    assert scheduled("no-toleration") is None


def test_stage_pods_wait_for_their_container(api_client, namespace):
    """kwok completes ordinary Job pods, but leaves TweetBot stage pods Running for whatever plays the container."""
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    manifest = job("held")
    manifest["spec"]["template"]["metadata"] = {"labels": {"huggingtweets.dev/stage": "scrape"}}
    batch.create_namespaced_job(namespace, manifest)
    batch.create_namespaced_job(namespace, job("ordinary"))

    def phase(name):
        pods = job_pods(core, namespace, name)
        return pods[0].status.phase if pods else None

    wait_for(lambda: phase("ordinary") == "Succeeded", what="the ordinary pod to complete")
    wait_for(lambda: phase("held") == "Running", what="the stage pod to run")
    assert phase("held") == "Running"
