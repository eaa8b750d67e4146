"""The controller's decisions with fakes of our own interfaces (`KubeApi`, `ArtifactStore`, the clock and the
timer); what the API server decides (pruning, the status subresource, RBAC, garbage collection) is tested
against the real one in test_operator.py."""

from __future__ import annotations

import copy
import itertools
from datetime import datetime, timezone

import pytest
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY

from tweetbot_operator.controller import ArtifactsLeft, Controller
from tweetbot_operator.names import FINALIZER
from tweetbot_operator.settings import Settings
from tweetbot_operator.spec import SECRET_OPT_IN_LABEL
from tweetbot_operator.workqueue import Request
from tweetbot_trainer.contract import BOT_LABEL, StageResult

from test_crd import merge  # JSON merge patch, as the API server applies it

NS = "bots"
SETTINGS = Settings(trainer_image="trainer:test", workers=1)
BOT_PATH = f"/apis/huggingtweets.dev/v1alpha1/namespaces/{NS}/tweetbots/cyborg"


class FakeKube:
    """Objects by (plural, namespace, name), with resourceVersions, 404 and 409 as the API server answers;
    `fail` makes the next call of a method on a path raise."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], ApiException] = {}
        self._versions = itertools.count(1)

    @staticmethod
    def _parse(path: str):
        parts = path.split("/")
        namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts else None
        plural_at = max(i for i, part in enumerate(parts) if part in ("tweetbots", "jobs", "services", "secrets", "pods", "events", "workloads"))
        name = parts[plural_at + 1] if len(parts) > plural_at + 1 else None
        return parts[plural_at], namespace, name, path.endswith("/status")

    def _call(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        error = self.fail.pop((method, path), None)
        if error is not None:
            raise error

    def put(self, plural: str, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[(plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def get(self, path: str, **query) -> dict:
        self._call("GET", path)
        plural, namespace, name, _ = self._parse(path)
        if (plural, namespace, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[(plural, namespace, name)])

    def items(self, path: str, labelSelector: str = "", **query):
        self._call("LIST", path)
        plural, namespace, _, _ = self._parse(path)
        wanted = dict(term.split("=") if "=" in term else (term, None) for term in labelSelector.split(",") if term)
        for (kind, ns, _), obj in list(self.objects.items()):
            labels = obj["metadata"].get("labels") or {}
            if kind == plural and namespace in (None, ns) and all(
                    key in labels and (value is None or labels[key] == value) for key, value in wanted.items()):
                yield copy.deepcopy(obj)

    def create(self, path: str, body: dict) -> dict:
        self._call("POST", path)
        plural, namespace, _, _ = self._parse(path)
        name = body["metadata"].get("name") or f"{body['metadata']['generateName']}{next(self._versions)}"
        if (plural, namespace, name) in self.objects:
            raise ApiException(status=409, reason="Conflict")
        return self.put(plural, {**body, "metadata": {**body["metadata"], "name": name, "namespace": namespace}})

    def merge_patch(self, path: str, body: dict) -> dict:
        self._call("PATCH", path)
        plural, namespace, name, status = self._parse(path)
        current = self.objects[(plural, namespace, name)]
        if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        patched = copy.deepcopy(current)
        if status:
            patched["status"] = merge(patched.get("status") or {}, body["status"])
        else:
            patched["metadata"] = merge(patched["metadata"], {k: v for k, v in body["metadata"].items() if k != "resourceVersion"})
        written = self.put(plural, patched)
        if patched["metadata"].get("deletionTimestamp") and not patched["metadata"].get("finalizers"):
            del self.objects[(plural, namespace, name)]
        return written

    def delete(self, path: str, body: dict | None = None) -> dict:
        self._call("DELETE", path)
        plural, namespace, name, _ = self._parse(path)
        if self.objects.pop((plural, namespace, name), None) is None:
            raise ApiException(status=404, reason="Not Found")
        return {}


class FakeArtifacts:
    def __init__(self):
        self.deleted: list[list[str]] = []
        self.error: Exception | None = None

    def read_progress(self, layout, credentials):
        return None

    def delete_artifacts(self, layouts, credentials, deadline_seconds):
        if self.error is not None:
            raise self.error
        self.deleted.append([layout.run_id for layout in layouts])
        return 3


def tweetbot(**spec_changes) -> dict:
    spec = {
        "handles": ["alice"],
        "source": {"x": {"bearerTokenSecretRef": {"name": "x-api"}}},
        "output": {"s3": {"bucket": "bots", "credentialsSecretRef": {"name": "s3-creds"}}},
        **spec_changes,
    }
    return {"apiVersion": "huggingtweets.dev/v1alpha1", "kind": "TweetBot",
            "metadata": {"name": "cyborg", "namespace": NS, "generation": 1}, "spec": spec}


@pytest.fixture
def world():
    kube, artifacts, events, timers = FakeKube(), FakeArtifacts(), [], []
    for name, data in (("x-api", {"token": "eA=="}), ("s3-creds", {"AWS_ACCESS_KEY_ID": "YQ==", "AWS_SECRET_ACCESS_KEY": "Yg=="})):
        kube.put("secrets", {"metadata": {"name": name, "namespace": NS, "labels": {SECRET_OPT_IN_LABEL: "true"}}, "data": data})
    controller = Controller(kube, SETTINGS, artifacts, clock=itertools.count().__next__,
                            now=lambda: datetime(2026, 12, 2, tzinfo=timezone.utc),
                            later=lambda delay, action: timers.append(delay),
                            events=lambda bot, kind, reason, message: events.append((kind, reason, message)))
    return controller, kube, artifacts, events, timers


def add_bot(controller, kube, **spec_changes) -> dict:
    bot = kube.put("tweetbots", tweetbot(**spec_changes))
    controller.bot_event("ADDED", bot)
    return bot


def bot_status(kube) -> dict:
    return kube.objects[("tweetbots", NS, "cyborg")].get("status") or {}


def test_a_new_bots_first_job_goes_out_before_its_status(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    jobs = [obj for (plural, *_), obj in kube.objects.items() if plural == "jobs"]
    assert [job["metadata"]["labels"]["huggingtweets.dev/stage"] for job in jobs] == ["scrape"]
    owner = jobs[0]["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TweetBot" and owner["controller"] and owner["uid"] == "uid-cyborg"
    assert bot_status(kube) == {}
    controller.job_event("ADDED", jobs[0])
    controller.reconcile((NS, "cyborg"))
    assert bot_status(kube)["phase"] == "Scraping"
    assert bot_status(kube)["stages"]["scrape"]["state"] == "Pending"


def test_the_echo_of_our_own_write_starts_no_pass(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    controller.reconcile((NS, "cyborg"))  # writes the status
    echo = kube.objects[("tweetbots", NS, "cyborg")]["metadata"]["resourceVersion"]
    kube.calls.clear()
    controller.reconcile((NS, "cyborg"), Request(echo_of=echo))
    assert kube.calls == []


def test_secrets_are_read_only_when_a_job_is_due(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    assert ("GET", f"/api/v1/namespaces/{NS}/secrets/x-api") in kube.calls
    controller.secrets._shared.clear()
    kube.calls.clear()
    controller.reconcile((NS, "cyborg"))  # the scrape Job exists: nothing to create
    assert not [call for call in kube.calls if "/secrets/" in call[1]]


def test_a_conflicting_status_write_is_retried_from_a_fresh_read(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    kube.fail[("PATCH", BOT_PATH + "/status")] = ApiException(status=409, reason="Conflict")
    controller.reconcile((NS, "cyborg"))
    assert bot_status(kube)["phase"] == "Scraping"
    assert ("GET", BOT_PATH) in kube.calls  # the retry read the bot from the API server


def test_a_refused_job_is_in_the_status_within_the_same_pass(world):
    controller, kube, _, events, _ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    body = '{"message": "jobs.batch is forbidden: exceeded quota: jobs"}'
    scrape = next(name for (plural, _, name) in kube.objects if plural == "jobs")
    kube.objects.pop(("jobs", NS, scrape))
    controller.cache.forget_job({"metadata": {"namespace": NS, "name": scrape, "labels": {BOT_LABEL: "cyborg"}}})
    kube.fail[("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")] = ApiException(status=403, reason="Forbidden", http_resp=None)
    kube.fail[("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")].body = body
    controller.reconcile((NS, "cyborg"))
    status = bot_status(kube)
    assert status["phase"] == "Pending" and "exceeded quota: jobs" in status["lastError"]
    assert events[-1][:2] == ("Warning", "JobRejected")


def test_job_events_that_change_nothing_of_the_status_queue_nothing(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    controller.reconcile((NS, "cyborg"))
    job = next(obj for (plural, *_), obj in kube.objects.items() if plural == "jobs")
    while len(controller.queue):
        controller.queue.done(controller.queue.get()[0])
    controller.job_event("MODIFIED", {**job, "status": {"active": 1, "startTime": "2026-12-02T00:00:00Z"}})
    assert len(controller.queue) == 1
    controller.queue.done(controller.queue.get()[0])
    controller.job_event("MODIFIED", {**job, "status": {"active": 1, "ready": 1, "startTime": "2026-12-02T00:00:00Z"}})
    assert len(controller.queue) == 0


def test_a_failing_pass_is_retried_later_and_later(world):
    controller, kube, _, _, timers = world
    add_bot(controller, kube)
    for _ in range(3):
        kube.fail[("GET", BOT_PATH)] = ApiException(status=500, reason="Internal Server Error")
        controller.reconcile((NS, "cyborg"), Request(fresh=True))
    assert timers == [2.0, 4.0, 8.0]


def test_deleting_keeps_the_finalizer_until_the_artifacts_are_gone(world):
    controller, kube, artifacts, events, _ = world
    add_bot(controller, kube, deletionPolicy="Delete")
    controller.reconcile((NS, "cyborg"))
    assert kube.objects[("tweetbots", NS, "cyborg")]["metadata"]["finalizers"] == [FINALIZER]
    kube.objects[("tweetbots", NS, "cyborg")]["metadata"]["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    controller.cache.forget_bot((NS, "cyborg"))
    artifacts.error = TimeoutError("S3 did not answer")
    for _ in range(2):
        with pytest.raises(ArtifactsLeft, match="spec.deletionPolicy is set to Retain"):
            controller._pass((NS, "cyborg"), fresh=True)
    assert [event[1] for event in events if event[0] == "Warning"] == ["ArtifactsLeft"]  # posted once
    assert ("tweetbots", NS, "cyborg") in kube.objects
    artifacts.error = None
    controller.reconcile((NS, "cyborg"), Request(fresh=True))
    assert ("tweetbots", NS, "cyborg") not in kube.objects
    assert artifacts.deleted and events[-1][1] == "ArtifactsDeleted"


def test_a_gangs_service_is_created_by_the_next_pass_when_the_one_that_created_its_job_did_not_get_to_it(world):
    """Without it, the pods of a Job created just before the operator died would wait for a rendezvous name that
    never resolves."""
    controller, kube, *_ = world
    add_bot(controller, kube, resources={"gpus": 1, "nodes": 2})
    controller.reconcile((NS, "cyborg"))
    scrape = next(obj for (plural, *_), obj in kube.objects.items() if plural == "jobs")
    name = scrape["metadata"]["name"]
    scrape["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1,
                        "startTime": "2026-12-02T00:00:00Z", "completionTime": "2026-12-02T00:01:00Z"}
    message = StageResult(stage="scrape", run_id=scrape["metadata"]["labels"]["huggingtweets.dev/run"], ok=True,
                          artifacts={"datasetUri": "s3://bots/d.jsonl"}).to_termination_message()
    kube.put("pods", {"metadata": {"name": f"{name}-a", "namespace": NS, "labels": {"job-name": name},
                                   "creationTimestamp": "2026-12-02T00:00:00Z"},
                      "status": {"phase": "Succeeded",
                                 "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": message}}}]}})
    controller.job_event("MODIFIED", kube.put("jobs", scrape))
    kube.fail[("POST", f"/api/v1/namespaces/{NS}/services")] = ApiException(status=503, reason="Service Unavailable")
    controller.reconcile((NS, "cyborg"))
    train = next(obj for (plural, *_), obj in kube.objects.items()
                 if plural == "jobs" and obj["metadata"]["labels"]["huggingtweets.dev/stage"] == "train")
    assert not [key for key in kube.objects if key[0] == "services"]
    controller.reconcile((NS, "cyborg"), Request(fresh=True))
    service = kube.objects[("services", NS, train["metadata"]["name"])]
    assert service["metadata"]["ownerReferences"][0]["uid"] == train["metadata"]["uid"]
    kube.calls.clear()
    controller.reconcile((NS, "cyborg"), Request(fresh=True))
    assert not [call for call in kube.calls if "/services" in call[1]]  # once known, not asked for again


def test_a_restarted_gang_takes_over_the_service_its_deleted_job_still_owned(world):
    """The gang's Job is deleted and created again under the same name: the old Job's Service would go with it
    (garbage collection) and leave the new pods without their names."""
    controller, kube, *_ = world
    add_bot(controller, kube, resources={"gpus": 1, "nodes": 2})
    job = {"metadata": {"name": "cyborg-1-train", "namespace": NS, "uid": "second", "labels": {BOT_LABEL: "cyborg"}},
           "spec": {"template": {"spec": {"subdomain": "cyborg-1-train"}}}, "status": {}}
    kube.put("services", {"metadata": {"name": "cyborg-1-train", "namespace": NS,
                                       "ownerReferences": [{"kind": "Job", "name": "cyborg-1-train", "uid": "first"}]}})
    controller._ensure_services([job])
    assert [owner["uid"] for owner in kube.objects[("services", NS, "cyborg-1-train")]["metadata"]["ownerReferences"]] == ["second"]


def test_a_queued_job_s_status_says_why_kueue_keeps_it_waiting(world):
    controller, kube, *_ = world
    add_bot(controller, kube, resources={"gpus": 1, "queueName": "team-a"})
    controller.reconcile((NS, "cyborg"))
    scrape = next(obj for (plural, *_), obj in kube.objects.items() if plural == "jobs")
    controller.job_event("ADDED", scrape)
    kube.put("workloads", {"metadata": {"name": "job-x", "namespace": NS, "creationTimestamp": "2026-12-02T00:00:00Z",
                                        "labels": {"kueue.x-k8s.io/job-uid": scrape["metadata"]["uid"]}},
                           "status": {"conditions": [{"type": "QuotaReserved", "status": "False",
                                                      "message": "LocalQueue team-a doesn't exist"}]}})
    kube.put("workloads", {"metadata": {"name": "job-y", "namespace": NS, "creationTimestamp": "2026-12-02T00:00:00Z",
                                        "labels": {"kueue.x-k8s.io/job-uid": "another-job"}},
                           "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "message": "not ours"}]}})
    controller.reconcile((NS, "cyborg"))
    status = bot_status(kube)
    assert status["phase"] == "Queued"
    reconciling = next(c for c in status["conditions"] if c["type"] == "Reconciling")
    assert reconciling["message"] == f"Job {scrape['metadata']['name']} is queued: LocalQueue team-a doesn't exist"


def test_a_pass_from_the_watch_cache_sees_the_rerun_annotation(world):
    """The cache keeps what the plan reads of metadata: without the annotation, passes from watch events and
    fresh passes would name different runs and create Jobs for both."""
    from tweetbot_operator.spec import RERUN_ANNOTATION, run_id_for

    controller, kube, *_ = world
    bot = tweetbot()
    bot["metadata"]["annotations"] = {RERUN_ANNOTATION: "2026-12-03T10:00:00Z",
                                      "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 10000 + "}"}
    bot = kube.put("tweetbots", bot)
    controller.bot_event("ADDED", bot)
    assert "kubectl.kubernetes.io/last-applied-configuration" not in controller.cache.bot((NS, "cyborg"))["metadata"]["annotations"]
    controller.reconcile((NS, "cyborg"))
    [scrape] = [obj for (plural, *_), obj in kube.objects.items() if plural == "jobs"]
    assert scrape["metadata"]["labels"]["huggingtweets.dev/run"] == run_id_for(bot)


def test_a_failing_pass_counts_an_error_and_a_retry(world):
    controller, kube, *_ = world
    add_bot(controller, kube)
    labels = {"name": controller.queue.name}
    errors = REGISTRY.get_sample_value("tweetbot_reconcile_errors_total") or 0.0
    retries = REGISTRY.get_sample_value("tweetbot_workqueue_retries_total", labels) or 0.0
    kube.fail[("GET", BOT_PATH)] = ApiException(status=500, reason="Internal Server Error")
    controller.reconcile((NS, "cyborg"), Request(fresh=True))
    assert REGISTRY.get_sample_value("tweetbot_reconcile_errors_total") == errors + 1
    assert REGISTRY.get_sample_value("tweetbot_workqueue_retries_total", labels) == retries + 1
