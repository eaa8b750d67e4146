"""The real operator process against the real control plane: a TweetBot's whole lifecycle.

kwok runs the stage pods on fake nodes and leaves them Running; each test plays the container by writing
the pod's final status with a termination message, exactly what a kubelet reports for a finished container.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from tweetbot_dev.operator_process import OperatorProcess, play_container
from tweetbot_dev.polling import wait_for
from tweetbot_operator.spec import SECRET_OPT_IN_LABEL
from tweetbot_trainer.errors import UnknownHandle
from tweetbot_trainer.contract import (BOT_LABEL, RUN_LABEL, S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV, STAGE_LABEL, HandleStats,
                                       Progress, S3Layout, StageResult)

pytestmark = pytest.mark.cluster

OPT_IN = {SECRET_OPT_IN_LABEL: "true"}
GONE_S3 = "http://127.0.0.1:9"
REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "huggingtweets.dev", "v1alpha1", "tweetbots"


@pytest.fixture(scope="module")
def operator(dev_env, api_client, tmp_path_factory):
    subprocess.run(
        [str(dev_env.cluster.kubectl), "--kubeconfig", str(dev_env.kubeconfig), "apply", "-f", str(REPO / "crds")],
        check=True, capture_output=True,
    )
    # The dev S3 server, and a port where nothing listens (an S3 that is gone).
    process = OperatorProcess(dev_env, tmp_path_factory.mktemp("operator"),
                              env={"TWEETBOT_S3_ENDPOINTS": f"{dev_env.s3_endpoint},{GONE_S3}"})
    process.start()
    yield process
    process.stop()


@pytest.fixture
def apis(api_client):
    return client.CustomObjectsApi(api_client), client.BatchV1Api(api_client), client.CoreV1Api(api_client)


@pytest.fixture
def secrets(api_client, namespace):
    core = client.CoreV1Api(api_client)
    for name, data in (("x-api", {"token": "x-secret-value"}), ("hf", {"token": "hf_secret_value"})):
        core.create_namespaced_secret(namespace, {"metadata": {"name": name, "labels": OPT_IN}, "stringData": data})


def tweetbot(name="cyborg", **spec_changes) -> dict:
    spec = {
        "handles": ["@PurefulSoul", "turtlebreezee"],
        "source": {"x": {"bearerTokenSecretRef": {"name": "x-api"}}},
        "output": {"s3": {"bucket": "bots"}, "hub": {"tokenSecretRef": {"name": "hf"}}},
        "resources": {"gpus": 2},
        "backoffLimit": 0,
    }
    spec.update(spec_changes)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TweetBot", "metadata": {"name": name}, "spec": spec}


def get_bot(custom, namespace, name="cyborg") -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_phase(custom, namespace, phase, name="cyborg", timeout=60) -> dict:
    def reached():
        bot = get_bot(custom, namespace, name)
        return bot if (bot.get("status") or {}).get("phase") == phase else None

    try:
        return wait_for(reached, timeout=timeout, what=f"phase {phase}")
    except AssertionError:
        raise AssertionError(f"never reached {phase}; status: {json.dumps(get_bot(custom, namespace, name).get('status'), indent=1)}")


def stage_jobs(batch, namespace, bot="cyborg", stage=None):
    selector = f"{BOT_LABEL}={bot}" + (f",{STAGE_LABEL}={stage}" if stage else "")
    return batch.list_namespaced_job(namespace, label_selector=selector).items


def wait_job(batch, namespace, stage, bot="cyborg"):
    return wait_for(lambda: (stage_jobs(batch, namespace, bot, stage) or [None])[0], what=f"the {stage} Job")


def succeed(core, job, **fields):
    labels = job.metadata.labels
    play_container(core, job.metadata.namespace, job.metadata.name,
                   StageResult(stage=labels[STAGE_LABEL], run_id=labels[RUN_LABEL], **fields))


SCRAPE_STATS = [HandleStats("purefulsoul", 3200, 310, 411, 2479, "Pureful Soul"), HandleStats("turtlebreezee", 812, 0, 37, 775)]


def test_a_bot_runs_scrape_train_publish_and_succeeds(operator, apis, namespace, secrets, dev_env):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(resources={"gpus": 2, "queueName": "team-a"}))

    scrape = wait_job(batch, namespace, "scrape")
    assert scrape.metadata.owner_references[0].kind == "TweetBot"
    assert "nvidia.com/gpu" not in json.dumps(scrape.spec.template.spec.containers[0].resources.to_dict())
    env = {item.name: item for item in scrape.spec.template.spec.containers[0].env}
    assert env["X_BEARER_TOKEN"].value_from.secret_key_ref.name == "x-api"
    assert scrape.spec.suspend is True and wait_phase(custom, namespace, "Queued")
    batch.patch_namespaced_job(scrape.metadata.name, namespace, {"spec": {"suspend": False}})  # as Kueue admits it
    wait_phase(custom, namespace, "Scraping")
    succeed(core, scrape, data=SCRAPE_STATS, artifacts={"datasetUri": "s3://bots/dataset.jsonl"})

    train = wait_job(batch, namespace, "train")
    assert train.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert train.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
    batch.patch_namespaced_job(train.metadata.name, namespace, {"spec": {"suspend": False}})
    wait_for(lambda: core.list_namespaced_pod(namespace, label_selector=f"job-name={train.metadata.name}").items
             and core.list_namespaced_pod(namespace, label_selector=f"job-name={train.metadata.name}").items[0].spec.node_name,
             what="the train pod to be scheduled")
    train_pod = core.list_namespaced_pod(namespace, label_selector=f"job-name={train.metadata.name}").items[0]
    assert train_pod.spec.node_name.startswith("kwok-gpu-")
    bot = wait_phase(custom, namespace, "Training")
    assert bot["status"]["data"][0]["kept"] == 2479
    succeed(core, train, metrics={"trainLoss": 2.9, "evalLoss": 3.1, "perplexity": 22.2, "steps": 480})

    publish = wait_job(batch, namespace, "publish")
    assert "nvidia.com/gpu" not in json.dumps(publish.spec.template.spec.containers[0].resources.to_dict())
    batch.patch_namespaced_job(publish.metadata.name, namespace, {"spec": {"suspend": False}})
    succeed(core, publish, artifacts={"hubUrl": "https://huggingface.co/org/purefulsoul-turtlebreezee", "hubCommit": "abc123"})

    bot = wait_phase(custom, namespace, "Succeeded")
    status = bot["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False", "DataReady": "True", "Trained": "True", "Published": "True"}
    assert status["metrics"]["perplexity"] == 22.2
    assert status["artifacts"]["hubCommit"] == "abc123" and status["artifacts"]["datasetUri"].startswith("s3://")
    assert status["observedGeneration"] == bot["metadata"]["generation"]
    assert set(status["stages"]) == {"scrape", "train", "publish"}

    kubectl = [str(dev_env.cluster.kubectl), "--kubeconfig", str(dev_env.kubeconfig), "-n", namespace]
    waited = subprocess.run(kubectl + ["wait", "--for=condition=Ready", "tweetbot/cyborg", "--timeout=10s"],
                            capture_output=True, text=True)
    assert waited.returncode == 0, waited.stderr
    row = subprocess.run(kubectl + ["get", "tb", "cyborg", "--no-headers"], capture_output=True, text=True).stdout.split()
    assert row[:5] == ["cyborg", '["@PurefulSoul","turtlebreezee"]', "Succeeded", "3/3", "True"]
    reasons = [event.reason for event in core.list_namespaced_event(namespace, field_selector="involvedObject.name=cyborg").items]
    assert "Succeeded" in reasons and "JobCreated" in reasons
    # No secret value anywhere the operator writes.
    everything = json.dumps(bot) + json.dumps([e.message for e in core.list_namespaced_event(namespace).items])
    assert "x-secret-value" not in everything and "hf_secret_value" not in everything
    with urllib.request.urlopen(operator.metrics_url) as response:
        exposed = response.read().decode()
    assert 'tweetbot_bots{phase="Succeeded"}' in exposed
    # The work queue handled the bot, and the build says which operator this is.
    adds = re.search(r'^tweetbot_workqueue_adds_total\{name="tweetbots"\} (\S+)$', exposed, re.MULTILINE)
    assert adds and float(adds.group(1)) >= 1
    assert re.search(r'^tweetbot_build_info\{.*\bversion="\d+\.\d+\.\d+".*\} 1\.0$', exposed, re.MULTILINE)


def test_a_failing_stage_is_retried_then_fails_the_bot(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(backoffLimit=1))
    scrape = wait_job(batch, namespace, "scrape")
    assert scrape.spec.backoff_limit == 1
    failure = StageResult(stage="scrape", run_id=scrape.metadata.labels[RUN_LABEL], ok=False,
                          error="X API answered 401 Unauthorized: check the token in Secret x-api")
    play_container(core, namespace, scrape.metadata.name, failure, exit_code=1)
    # The Job controller retries with its own backoff (about 10 s), then gives up.
    play_container(core, namespace, scrape.metadata.name, failure, exit_code=1)
    bot = wait_phase(custom, namespace, "Failed")
    assert bot["status"]["attempts"] == 2
    assert "X API answered 401 Unauthorized" in bot["status"]["lastError"]
    assert next(c for c in bot["status"]["conditions"] if c["type"] == "Stalled")["status"] == "True"
    assert not stage_jobs(batch, namespace, stage="train")


def test_a_failure_no_retry_can_mend_fails_the_bot_after_one_pod(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(backoffLimit=3))
    scrape = wait_job(batch, namespace, "scrape")
    failure = StageResult(stage="scrape", run_id=scrape.metadata.labels[RUN_LABEL], ok=False,
                          error="@purefulsoul does not exist on x: check spec.handles")
    play_container(core, namespace, scrape.metadata.name, failure, exit_code=UnknownHandle.exit_code)
    bot = wait_phase(custom, namespace, "Failed")
    assert "@purefulsoul does not exist" in bot["status"]["lastError"]
    job = batch.read_namespaced_job(scrape.metadata.name, namespace)
    assert [c.reason for c in job.status.conditions if c.type == "Failed"] == ["PodFailurePolicy"]
    assert len(core.list_namespaced_pod(namespace, label_selector=f"job-name={scrape.metadata.name}").items) == 1


def test_an_evicted_pod_is_retried_without_using_up_the_retries(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(backoffLimit=0))
    scrape = wait_job(batch, namespace, "scrape")
    evicted = StageResult(stage="scrape", run_id=scrape.metadata.labels[RUN_LABEL], ok=False, error="terminated")
    play_container(core, namespace, scrape.metadata.name, evicted, exit_code=143, disrupted=True)
    succeed(core, scrape, data=SCRAPE_STATS)  # a second pod, though backoffLimit is 0
    wait_phase(custom, namespace, "Training")
    assert batch.read_namespaced_job(scrape.metadata.name, namespace).status.failed in (None, 0)


def test_every_train_metric_is_kept_and_the_api_servers_warnings_are_logged(operator, apis, api_client, namespace, caplog):
    from tweetbot_operator.kube import Kube, path

    custom, _, _ = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(name="schema", suspend=True))
    status = path(f"{GROUP}/{VERSION}", PLURAL, namespace, "schema", "status")
    metrics = {"trainLoss": 2.9, "evalLoss": 3.1, "perplexity": 22.2, "steps": 480, "tokens": 983040,
               "durationSeconds": 310.5, "gpuSeconds": 621.0}  # what the train stage reports
    kube = Kube(api_client)
    with caplog.at_level("WARNING", logger="tweetbot.kube"):
        kept = kube.merge_patch(status, {"status": {"metrics": metrics}})["status"]["metrics"]
        assert kept == metrics and not caplog.records
        kube.merge_patch(status, {"status": {"metrics": {"flops": 1}}})
    assert 'unknown field "status.metrics.flops"' in caplog.text


def test_an_operator_restart_neither_duplicates_nor_loses_jobs(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())
    scrape = wait_job(batch, namespace, "scrape")
    operator.kill()
    succeed(core, scrape, data=SCRAPE_STATS)  # the stage finishes while no operator is running
    operator.start()
    train = wait_job(batch, namespace, "train")
    wait_phase(custom, namespace, "Training")
    operator.kill()
    operator.start()
    succeed(core, train, metrics={"evalLoss": 3.0})
    succeed(core, wait_job(batch, namespace, "publish"), artifacts={"hubCommit": "def456"})
    wait_phase(custom, namespace, "Succeeded")
    assert sorted(job.metadata.labels[STAGE_LABEL] for job in stage_jobs(batch, namespace)) == ["publish", "scrape", "train"]


def test_a_spec_edit_starts_a_new_run(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())
    first = wait_job(batch, namespace, "scrape")
    first_run = wait_phase(custom, namespace, "Scraping")["status"]["runId"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg", {"spec": {"training": {"epochs": 2}}})

    def new_run():
        jobs = stage_jobs(batch, namespace, stage="scrape")
        return jobs if [j.metadata.name for j in jobs] != [first.metadata.name] and len(jobs) == 1 else None

    [second] = wait_for(new_run, what="the old run's Job to be replaced")
    bot = get_bot(custom, namespace)
    assert second.metadata.labels[RUN_LABEL] == bot["status"]["runId"] != first_run
    assert bot["status"]["observedGeneration"] == 2
    request = json.loads(second.spec.template.spec.containers[0].env[0].value)
    assert request["training"]["epochs"] == 2


def test_a_finished_bot_republishes_on_a_hub_edit_reruns_when_annotated_and_not_on_a_run_control_edit(operator, apis, namespace, secrets):
    from tweetbot_operator.spec import RERUN_ANNOTATION

    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())
    succeed(core, wait_job(batch, namespace, "scrape"), data=SCRAPE_STATS)
    succeed(core, wait_job(batch, namespace, "train"), metrics={"evalLoss": 3.0})
    succeed(core, wait_job(batch, namespace, "publish"), artifacts={"hubCommit": "abc123"})
    first_run = wait_phase(custom, namespace, "Succeeded")["status"]["runId"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg", {"spec": {"backoffLimit": 4}})
    wait_for(lambda: get_bot(custom, namespace)["status"]["observedGeneration"] == 2, what="the edit observed")
    bot = get_bot(custom, namespace)
    assert bot["status"]["runId"] == first_run and bot["status"]["phase"] == "Succeeded"

    # Another Hub repository: publish alone again, on the same run; scrape and train stay as they were.
    before = {job.metadata.labels[STAGE_LABEL]: job.metadata.name for job in stage_jobs(batch, namespace)}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg",
                                          {"spec": {"output": {"hub": {"repoId": "bots/cyborg-v2"}}}})
    republish = wait_for(lambda: next((job for job in stage_jobs(batch, namespace, stage="publish")
                                       if job.metadata.name != before["publish"]), None), what="a second publish Job")
    assert republish.metadata.labels[RUN_LABEL] == first_run
    assert json.loads(republish.spec.template.spec.containers[0].env[0].value)["hub"]["repoId"] == "bots/cyborg-v2"
    succeed(core, republish, artifacts={"hubCommit": "def456"})
    wait_for(lambda: get_bot(custom, namespace)["status"]["artifacts"].get("hubCommit") == "def456", what="the new commit")
    assert get_bot(custom, namespace)["status"]["phase"] == "Succeeded"
    wait_for(lambda: {job.metadata.labels[STAGE_LABEL]: job.metadata.name for job in stage_jobs(batch, namespace)}
             == {**before, "publish": republish.metadata.name}, what="the superseded publish Job to go")

    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg",
                                          {"metadata": {"annotations": {RERUN_ANNOTATION: "2026-12-03T10:00:00Z"}}})
    scrape = wait_for(lambda: next((job for job in stage_jobs(batch, namespace, stage="scrape")
                                    if job.metadata.labels[RUN_LABEL] != first_run), None), what="a new run's scrape Job")
    bot = wait_phase(custom, namespace, "Scraping")
    assert bot["status"]["runId"] == scrape.metadata.labels[RUN_LABEL] and bot["status"]["rerun"] == "2026-12-03T10:00:00Z"
    assert scrape.spec.backoff_limit == 4


def test_a_scheduled_bot_ticks_and_a_tick_without_new_posts_trains_nothing(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(schedule={"cron": "* * * * *"}))
    scrape = wait_job(batch, namespace, "scrape")
    first = scrape.metadata.labels[RUN_LABEL]
    succeed(core, scrape, data=SCRAPE_STATS, metrics={"posts": 3254, "newPosts": 3254})
    succeed(core, wait_job(batch, namespace, "train"), metrics={"evalLoss": 3.0})
    succeed(core, wait_job(batch, namespace, "publish"), artifacts={"hubCommit": "abc123"})
    status = wait_phase(custom, namespace, "Succeeded")["status"]
    assert status["history"][0]["runId"] == first and status["nextScheduleTime"]

    # The next minute's tick: a run whose scrape extends the first run's posts.
    tick = wait_for(lambda: next((job for job in stage_jobs(batch, namespace, stage="scrape")
                                  if job.metadata.labels[RUN_LABEL] != first), None), timeout=90, what="a tick's scrape Job")
    assert json.loads(tick.spec.template.spec.containers[0].env[0].value)["extends_run"] == first
    succeed(core, tick, data=SCRAPE_STATS, metrics={"posts": 3254, "newPosts": 0})
    up_to_date = wait_for(lambda: (bot := get_bot(custom, namespace))["status"].get("history", [{}])[0].get("outcome") == "UpToDate"
                          and bot, what="the tick to end up to date")
    status = up_to_date["status"]
    assert status["phase"] == "Succeeded" and status["scheduleTime"] == status["lastScheduleTime"]
    assert [entry["outcome"] for entry in status["history"]] == ["UpToDate", "Succeeded"]
    assert status["history"][0]["modelRunId"] == first and status["artifacts"]["hubCommit"] == "abc123"
    assert stage_jobs(batch, namespace, stage="train") == []  # none for the tick; the first run's went with its run


def test_a_four_node_training_places_one_pod_per_node_behind_its_own_service(operator, apis, api_client, namespace, secrets):
    from tweetbot_dev.cluster import fake_node

    custom, batch, core = apis
    pool = namespace[-6:]  # four nodes of 8 GPUs that only this test's bot selects
    nodes = [fake_node(f"kwok-a100-{pool}-{i}", gpus=8) for i in range(4)]
    for node in nodes:
        node["metadata"]["labels"]["pool"] = pool
        core.create_node(node)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(
            resources={"gpus": 8, "nodes": 4, "cpu": "8", "memory": "64Gi", "nodeSelector": {"pool": pool}}))
        succeed(core, wait_job(batch, namespace, "scrape"), data=SCRAPE_STATS)
        train = wait_job(batch, namespace, "train")
        assert (train.spec.completion_mode, train.spec.completions, train.spec.parallelism) == ("Indexed", 4, 4)
        service = wait_for(lambda: next(iter(core.list_namespaced_service(namespace).items), None), what="the headless Service")
        assert service.metadata.name == train.metadata.name and service.spec.cluster_ip == "None"
        assert [(ref.kind, ref.uid) for ref in service.metadata.owner_references] == [("Job", train.metadata.uid)]

        def placed():
            pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={train.metadata.name}").items
            return pods if len(pods) == 4 and all(pod.spec.node_name for pod in pods) else None

        pods = wait_for(placed, what="four train pods placed")
        assert sorted(pod.spec.node_name for pod in pods) == sorted(node["metadata"]["name"] for node in nodes)
        assert {pod.spec.hostname for pod in pods} == {f"{train.metadata.name}-{index}" for index in range(4)}
        assert all(pod.spec.subdomain == train.metadata.name for pod in pods)
        status = wait_for(lambda: (s := get_bot(custom, namespace)["status"]["stages"]["train"]).get("readyPods") == 4 and s,
                          what="four ready pods in the status")
        assert status["pods"] == 4
    finally:
        for node in nodes:
            core.delete_node(node["metadata"]["name"])


def test_a_gang_whose_pod_fails_starts_again_as_a_whole(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(
        resources={"gpus": 0, "nodes": 2, "cpu": "1", "memory": "1Gi"}, backoffLimit=1))
    succeed(core, wait_job(batch, namespace, "scrape"), data=SCRAPE_STATS)
    first = wait_job(batch, namespace, "train")
    wait_for(lambda: len([pod for pod in core.list_namespaced_pod(namespace, label_selector=f"job-name={first.metadata.name}").items
                          if pod.status.phase == "Running"]) == 2, what="both pods running")
    labels = first.metadata.labels
    play_container(core, namespace, first.metadata.name, StageResult(stage="train", run_id=labels[RUN_LABEL], ok=False,
                                                                      error="StageFailed: gloo: Connection reset by peer"), exit_code=1)
    # The Job controller fails the Job at once (podFailurePolicy); the operator makes a new one of the same name.
    second = wait_for(lambda: next((job for job in stage_jobs(batch, namespace, stage="train")
                                    if job.metadata.uid != first.metadata.uid), None), what="the gang's next Job")
    assert second.metadata.name == first.metadata.name
    bot = wait_for(lambda: (b := get_bot(custom, namespace))["status"]["stages"]["train"].get("restarts") == 1 and b,
                   what="the restart in the status")
    assert bot["status"]["phase"] == "Training" and bot["status"]["stages"]["train"]["failedPod"] in (0, 1)
    event = wait_for(lambda: next((e for e in core.list_namespaced_event(namespace).items if e.reason == "GangRestarting"), None),
                     what="a GangRestarting event")
    assert f"pod {bot['status']['stages']['train']['failedPod']} of Job {first.metadata.name} failed" in event.message

    def only_the_new_jobs_pods():  # the old Job's pods, named alike, are still going away
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={second.metadata.name}").items
        return len(pods) == 2 and all(pod.metadata.owner_references[0].uid == second.metadata.uid
                                      and pod.status.phase == "Running" for pod in pods)

    wait_for(only_the_new_jobs_pods, what="the new Job's two pods alone")
    # Its predecessor's Service, taken over before the garbage collector could delete it with the old Job.
    owned = lambda: [ref.uid for ref in core.read_namespaced_service(second.metadata.name, namespace).metadata.owner_references]
    wait_for(lambda: owned() == [second.metadata.uid], what="the Service owned by the new Job")
    for _ in range(2):
        succeed(core, second, metrics={"evalLoss": 3.0})
    succeed(core, wait_job(batch, namespace, "publish"), artifacts={"hubCommit": "abc123"})
    status = wait_phase(custom, namespace, "Succeeded")["status"]
    assert status["stages"]["train"]["restarts"] == 1 and status["metrics"]["evalLoss"] == 3.0
    assert owned() == [second.metadata.uid]  # still there: the collector did not take it


def test_suspend_stops_the_run_and_resume_continues_it(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())
    succeed(core, wait_job(batch, namespace, "scrape"), data=SCRAPE_STATS)
    wait_job(batch, namespace, "train")
    run_id = wait_phase(custom, namespace, "Training")["status"]["runId"]

    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg", {"spec": {"suspend": True}})
    bot = wait_phase(custom, namespace, "Suspended")
    wait_for(lambda: not stage_jobs(batch, namespace, stage="train"), what="the train Job to stop")
    assert stage_jobs(batch, namespace, stage="scrape"), "a finished stage is kept"

    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg", {"spec": {"suspend": False}})
    train = wait_job(batch, namespace, "train")
    bot = wait_phase(custom, namespace, "Training")
    assert bot["status"]["runId"] == run_id and train.metadata.labels[RUN_LABEL] == run_id
    assert bot["status"]["data"][1]["handle"] == "turtlebreezee"  # results of the finished stage kept


def test_deleting_a_bot_removes_its_jobs_and_pods(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())
    scrape = wait_job(batch, namespace, "scrape")
    wait_for(lambda: core.list_namespaced_pod(namespace, label_selector=f"job-name={scrape.metadata.name}").items,
             what="the scrape pod")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cyborg")

    def gone():
        try:
            get_bot(custom, namespace)
            return False
        except client.ApiException as error:
            return error.status == 404

    wait_for(gone, timeout=20, what="the TweetBot to be deleted without waiting on a finalizer")
    wait_for(lambda: not stage_jobs(batch, namespace), what="the garbage collector to delete the Jobs")
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector=f"{BOT_LABEL}=cyborg").items,
             what="the garbage collector to delete the pods")


def test_a_missing_secret_stalls_one_bot_and_the_others_go_on(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, tweetbot("lonely", source={"x": {"bearerTokenSecretRef": {"name": "absent"}}}))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot("fine"))

    def stalled():
        status = get_bot(custom, namespace, "lonely").get("status") or {}
        return status if any(c["type"] == "Stalled" and c["status"] == "True" for c in status.get("conditions", [])) else None

    status = wait_for(stalled, what="the bot to stall")
    assert status["lastError"] == "Secret 'absent' (named by spec.source.x.bearerTokenSecretRef) does not exist"
    assert not stage_jobs(batch, namespace, "lonely")
    wait_job(batch, namespace, "scrape", bot="fine")

    core.create_namespaced_secret(namespace, {"metadata": {"name": "absent", "labels": OPT_IN}, "stringData": {"token": "t"}})
    wait_job(batch, namespace, "scrape", bot="lonely")  # picked up by the timer, no edit needed
    wait_phase(custom, namespace, "Scraping", name="lonely")


@pytest.fixture
def minio(dev_env, api_client, namespace):
    """A bucket on the real S3 server, and a Secret with its credentials for the bot to name."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                      aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")
    bucket = f"artifacts-{namespace}"[:63].rstrip("-")
    s3.create_bucket(Bucket=bucket)
    client.CoreV1Api(api_client).create_namespaced_secret(namespace, {"metadata": {"name": "s3", "labels": OPT_IN}, "stringData": {
        "AWS_ACCESS_KEY_ID": dev_env.s3_access_key, "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key}})
    output = {"s3": {"bucket": bucket, "endpoint": dev_env.s3_endpoint, "credentialsSecretRef": {"name": "s3"}}}
    return s3, bucket, output


def test_live_training_progress_reaches_the_status(operator, apis, namespace, secrets, minio):
    custom, batch, core = apis
    s3, bucket, output = minio
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(output=output))
    succeed(core, wait_job(batch, namespace, "scrape"), data=SCRAPE_STATS)
    train = wait_job(batch, namespace, "train")
    run_id = wait_phase(custom, namespace, "Training")["status"]["runId"]
    report = Progress(step=120, total_steps=480, loss=3.25, tokens_per_second=5321.5, eta_seconds=1800,
                      updated_at="2026-12-03T02:10:00Z")
    s3.put_object(Bucket=bucket, Key=f"tweetbot/{namespace}/cyborg/{run_id}/train/progress.json", Body=report.to_json().encode())

    def progress():
        live = (get_bot(custom, namespace).get("status") or {}).get("progress") or {}
        return live if live.get("step") == 120 else None

    live = wait_for(progress, timeout=30, what="the progress report to reach the status")
    assert live == {"step": 120, "totalSteps": 480, "loss": 3.25, "tokensPerSecond": 5321.5, "etaSeconds": 1800,
                    "updatedAt": "2026-12-03T02:10:00Z", "summary": "train 25% (120/480 steps)"}
    succeed(core, train, metrics={"evalLoss": 3.0})
    wait_job(batch, namespace, "publish")
    assert wait_phase(custom, namespace, "Publishing")["status"]["progress"] == {"summary": "2/3"}


def test_progress_is_one_signed_get_and_reads_as_none_when_missing_or_refused(dev_env, namespace, minio):
    from tweetbot_operator.artifacts import read_progress

    s3, bucket, _ = minio
    layout = S3Layout(bucket=bucket, prefix="tweetbot", namespace=namespace, bot="cyborg", run_id="run1",
                      endpoint=dev_env.s3_endpoint)
    keys = {S3_ACCESS_KEY_ENV: dev_env.s3_access_key, S3_SECRET_KEY_ENV: dev_env.s3_secret_key}
    assert read_progress(layout, keys) is None  # no report yet
    report = Progress(step=7, total_steps=10, loss=2.5, tokens_per_second=99.5, eta_seconds=3)
    s3.put_object(Bucket=bucket, Key=layout.progress, Body=report.to_json().encode())
    assert read_progress(layout, keys) == report
    assert read_progress(layout, {**keys, S3_SECRET_KEY_ENV: "not-the-key"}) is None  # MinIO refuses the signature


def test_objects_are_addressed_as_boto3_does(monkeypatch):
    from tweetbot_operator.artifacts import object_url

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    layout = S3Layout(bucket="bots", prefix="p", namespace="ns", bot="b", run_id="r", region="eu-west-1")
    assert object_url(layout, "p/a b.json") == "https://bots.s3.eu-west-1.amazonaws.com/p/a%20b.json"
    dotted = S3Layout(bucket="my.bots", prefix="p", namespace="ns", bot="b", run_id="r", region="eu-west-1")
    assert object_url(dotted, "k") == "https://s3.eu-west-1.amazonaws.com/my.bots/k"
    minio = S3Layout(bucket="bots", prefix="p", namespace="ns", bot="b", run_id="r", endpoint="http://minio:9000/")
    assert object_url(minio, "k") == "http://minio:9000/bots/k"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local")
    assert object_url(layout, "k") == "http://s3.local/bots/k"


def test_deletion_policy_delete_removes_exactly_this_bots_runs(operator, apis, namespace, secrets, minio, dev_env):
    custom, batch, core = apis
    s3, bucket, output = minio
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot("doomed", output=output, deletionPolicy="Delete"))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot("kept", output=output))
    for name in ("doomed", "kept"):
        wait_job(batch, namespace, "scrape", bot=name)
    first = wait_phase(custom, namespace, "Scraping", name="doomed")["status"]["runId"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "doomed", {"spec": {"training": {"epochs": 2}}})
    run = wait_for(lambda: get_bot(custom, namespace, "doomed")["status"]["runId"] != first
                   and get_bot(custom, namespace, "doomed")["status"]["runId"], what="the edit's new run")
    assert wait_for(lambda: get_bot(custom, namespace, "doomed")["status"].get("runs"), what="the runs") == [first, run]
    # This bot's two runs; an earlier bot of the same name (deletionPolicy Retain, run "0ld0ne"); a bot whose
    # name shares the prefix; another bot.
    keys = [f"tweetbot/{namespace}/{bot}/{run_id}/data/dataset.jsonl"
            for bot, run_id in (("doomed", first), ("doomed", run), ("doomed", "0ld0ne"), ("doomed2", run), ("kept", run))]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    assert wait_for(lambda: get_bot(custom, namespace, "doomed")["metadata"].get("finalizers")) == ["huggingtweets.dev/artifacts"]
    assert not get_bot(custom, namespace, "kept")["metadata"].get("finalizers")

    for name in ("doomed", "kept"):
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def all_gone():
        return not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    wait_for(all_gone, timeout=60, what="both bots to be deleted")
    left = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert left == sorted(keys[2:])
    messages = {event.reason: event.message for event in core.list_namespaced_event(namespace).items}
    assert messages["ArtifactsDeleted"] == f"deleted 2 objects of 2 run(s) under s3://{bucket}/tweetbot/{namespace}/doomed/"


def test_a_bot_whose_artifacts_cannot_be_deleted_stays_until_they_are_or_its_policy_says_retain(
        operator, apis, namespace, secrets, minio, dev_env):
    custom, batch, core = apis
    _, bucket, output = minio
    gone = {"s3": {**output["s3"], "endpoint": GONE_S3}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot("stranded", output=gone, deletionPolicy="Delete"))
    wait_for(lambda: get_bot(custom, namespace, "stranded")["metadata"].get("finalizers"), what="the finalizer")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stranded")

    def warned():
        events = core.list_namespaced_event(namespace, field_selector="reason=ArtifactsLeft").items
        return events[0].message if events else None

    message = wait_for(warned, timeout=60, what="the ArtifactsLeft event")
    assert message.startswith("could not delete the runs ") and "spec.deletionPolicy is set to Retain" in message
    assert dev_env.s3_secret_key not in message
    time.sleep(5)  # more than one retry
    assert get_bot(custom, namespace, "stranded")["metadata"]["deletionTimestamp"]  # still there, finalizer kept

    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stranded", {"spec": {"deletionPolicy": "Retain"}})
    wait_for(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"], timeout=30,
             what="the bot to go once its policy is Retain")


def test_a_secret_without_the_opt_in_label_is_not_used(operator, apis, namespace, secrets, api_client):
    custom, batch, core = apis
    core.create_namespaced_secret(namespace, {"metadata": {"name": "service-db"}, "stringData": {"token": "db-password"}})
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, tweetbot("thief", source={"x": {"bearerTokenSecretRef": {"name": "service-db"}}}))

    def stalled():
        status = get_bot(custom, namespace, "thief").get("status") or {}
        return status.get("lastError")

    assert "is not labelled huggingtweets.dev/usable-by-tweetbots=true" in wait_for(stalled, what="the bot to stall")
    assert not stage_jobs(batch, namespace, "thief")
    core.patch_namespaced_secret("service-db", namespace, {"metadata": {"labels": OPT_IN}})
    wait_job(batch, namespace, "scrape", bot="thief")  # its owner opted in


def test_a_job_the_api_server_refuses_stalls_the_bot_with_the_servers_message(operator, apis, namespace, secrets):
    custom, batch, core = apis
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot())

    def rejected():
        status = get_bot(custom, namespace).get("status") or {}
        stalled = next((c for c in status.get("conditions", []) if c["type"] == "Stalled"), {})
        return status if stalled.get("reason") == "JobRejected" else None

    status = wait_for(rejected, timeout=30, what="the bot to stall on the refused Job")
    assert "exceeded quota: no-jobs" in status["lastError"] and status["phase"] == "Pending"
    core.delete_namespaced_resource_quota("no-jobs", namespace)
    wait_job(batch, namespace, "scrape")  # tried again at the next resync
    wait_phase(custom, namespace, "Scraping")


def test_a_result_is_read_before_a_zero_ttl_removes_its_job(operator, apis, namespace, secrets):
    custom, batch, core = apis
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(ttlSecondsAfterFinished=0))
    scrape = wait_job(batch, namespace, "scrape")
    operator.kill()
    succeed(core, scrape, data=SCRAPE_STATS)  # finished while no operator runs: only a Job TTL could act now
    time.sleep(5)
    operator.start()
    wait_job(batch, namespace, "train")
    bot = wait_phase(custom, namespace, "Training")
    assert bot["status"]["data"][0]["handle"] == "purefulsoul"
    wait_for(lambda: not stage_jobs(batch, namespace, stage="scrape"), what="the operator to remove the scrape Job")
    assert len(stage_jobs(batch, namespace, stage="train")) == 1  # no stage re-ran
    assert get_bot(custom, namespace)["status"]["stages"]["scrape"]["state"] == "Succeeded"


@pytest.fixture
def kueue(dev_env, tmp_path):
    """Kueue's manager for one test: left running, it would suspend the Jobs other tests admit by hand."""
    from tweetbot_dev.kueue import KueueProcess

    process = KueueProcess(dev_env, tmp_path)
    process.start()
    yield process
    process.stop()


def test_kueue_admits_a_queued_gang_as_one_workload_all_or_nothing(operator, apis, api_client, namespace, secrets, kueue):
    from tweetbot_dev.cluster import fake_node

    custom, batch, core = apis
    objects = client.CustomObjectsApi(api_client)
    pool = namespace[-6:]
    nodes = [fake_node(f"kwok-queued-{pool}-{i}", gpus=8) for i in range(4)]
    for node in nodes:
        node["metadata"]["labels"]["pool"] = pool
        core.create_node(node)
    kueue_api = ("kueue.x-k8s.io", "v1beta2")
    objects.create_cluster_custom_object(*kueue_api, "resourceflavors", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": f"a100-{pool}"}})
    # GPUs for one gang of four 8-GPU pods at a time.
    objects.create_cluster_custom_object(*kueue_api, "clusterqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": f"gpus-{pool}"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [{
                     "name": f"a100-{pool}", "resources": [{"name": "cpu", "nominalQuota": "200"},
                                                            {"name": "memory", "nominalQuota": "2Ti"},
                                                            {"name": "nvidia.com/gpu", "nominalQuota": "32"}]}]}]}})
    objects.create_namespaced_custom_object(*kueue_api, namespace, "localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "team-a"},
        "spec": {"clusterQueue": f"gpus-{pool}"}})
    try:
        resources = {"gpus": 8, "nodes": 4, "cpu": "8", "memory": "64Gi", "nodeSelector": {"pool": pool}, "queueName": "team-a"}
        trains = {}
        for name in ("cyborg", "twin"):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, tweetbot(name, resources=resources))
            succeed(core, wait_job(batch, namespace, "scrape", bot=name), data=SCRAPE_STATS)  # Kueue admitted it
            trains[name] = wait_job(batch, namespace, "train", bot=name)

        def pods_of(job):
            return core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}").items

        def workloads_of(job):
            return [w for w in objects.list_namespaced_custom_object(*kueue_api, namespace, "workloads")["items"]
                    if [ref["uid"] for ref in w["metadata"].get("ownerReferences", [])] == [job.metadata.uid]]

        def admitted(workload):
            return any(c["type"] == "Admitted" and c["status"] == "True" for c in workload.get("status", {}).get("conditions", []))

        # One of the two gangs holds all 32 GPUs; the other waits whole, suspended, without a single pod.
        first = wait_for(lambda: next((name for name, job in trains.items() if any(map(admitted, workloads_of(job)))), None),
                         what="a gang admitted")
        second = next(name for name in trains if name != first)
        [workload] = workloads_of(trains[first])
        assert [(p["count"]) for p in workload["spec"]["podSets"]] == [4]  # the gang is one workload of four pods
        placed = wait_for(lambda: (pods := pods_of(trains[first])) and len(pods) == 4 and all(p.spec.node_name for p in pods) and pods,
                          what="the admitted gang's four pods placed")
        assert sorted(p.spec.node_name for p in placed) == sorted(n["metadata"]["name"] for n in nodes)
        time.sleep(5)  # Kueue's scheduler has had cycles enough to admit the second, were there room
        assert batch.read_namespaced_job(trains[second].metadata.name, namespace).spec.suspend is True
        assert pods_of(trains[second]) == [] and not any(map(admitted, workloads_of(trains[second])))
        # Kueue's reason reaches the waiting bot's status.
        waiting = wait_for(lambda: (m := next(c["message"] for c in get_bot(custom, namespace, second)["status"]["conditions"]
                                               if c["type"] == "Reconciling")) and "nvidia.com/gpu" in m and m,
                           what="Kueue's reason in the status")
        assert waiting.startswith(f"Job {trains[second].metadata.name} is queued: ") and "quota" in waiting
        assert get_bot(custom, namespace, second)["status"]["phase"] == "Queued"

        # The first gang finishes: its quota goes to the second, whole.
        for _ in range(4):
            succeed(core, trains[first], metrics={"evalLoss": 3.0})
        wait_for(lambda: any(map(admitted, workloads_of(trains[second]))), timeout=90, what="the second gang admitted")
        wait_for(lambda: len(pods_of(trains[second])) == 4, what="the second gang's four pods")
    finally:
        for node in nodes:
            core.delete_node(node["metadata"]["name"])
        objects.delete_cluster_custom_object(*kueue_api, "clusterqueues", f"gpus-{pool}")
        objects.delete_cluster_custom_object(*kueue_api, "resourceflavors", f"a100-{pool}")
