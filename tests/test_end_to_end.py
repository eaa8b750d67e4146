"""End to end on one machine: `kubectl apply` a TweetBot and get a published model that writes posts.

Both images are built from the repository's Dockerfiles; the chart is installed with Helm; the operator and
every stage Job run as containers on the real node (kubelet, containerd, runc) under the securityContexts the
chart and the operator set; S3, the source archive and the Hub are local servers; DeepSpeed trains on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kubernetes import client

from tweetbot_dev.binaries import cache_root
from tweetbot_dev.demo import BUCKET, NAMESPACE, Demo, demo_bot
from tweetbot_dev.node import API_SERVICE_IP, NODE_NAME, ctr, kill_container
from tweetbot_dev.polling import wait_for
from tweetbot_trainer.contract import STAGE_LABEL

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def world():
    runs = cache_root() / "test-runs"
    runs.mkdir(parents=True, exist_ok=True)
    demo = Demo(Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-e2e-", dir=runs)), log=print)
    try:
        demo.up({"dreamer": 400, "gardener": 300, "sailor": 250}, owner_pid=os.getpid())
        yield demo
    finally:
        demo.down()


def pods_of(world, bot: str, stage: str | None = None) -> list:
    selector = f"huggingtweets.dev/bot={bot}" + (f",{STAGE_LABEL}={stage}" if stage else "")
    return client.CoreV1Api(world.api).list_namespaced_pod(NAMESPACE, label_selector=selector).items


def image_id(ref: str) -> str:
    """The image's config digest as buildah made it: what the kubelet reports as a container's imageID."""
    built = subprocess.run(["buildah", "images", "--no-trunc", "--format", "{{.ID}}", ref], capture_output=True,
                           text=True, check=True).stdout.split()
    [loaded] = [line.split()[0] for line in ctr("images", "list", "--quiet").stdout.splitlines() if line == ref]
    assert built and loaded == ref
    return built[0]


def test_one_handle_from_apply_to_generated_posts(world):
    world.apply(demo_bot("dreamer", ["dreamer"], world.env, world.hub.url))
    status = world.wait("dreamer", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    [row] = status["data"]
    assert row["handle"] == "dreamer" and row["downloaded"] == 400
    assert row["downloaded"] == row["retweets"] + row["short"] + row["kept"]
    assert status["metrics"]["evalLoss"] > 0 and status["metrics"]["steps"] > 0
    assert status["artifacts"]["modelUri"].startswith(f"s3://{BUCKET}/tweetbot/{NAMESPACE}/dreamer/")
    assert status["artifacts"]["hubUrl"] == f"{world.hub.url}/demo/dreamer"
    assert world.hub.repos["demo/dreamer"].head.id == status["artifacts"]["hubCommit"]
    posts = world.generate("demo/dreamer")
    assert len(posts) == 3 and all(post.startswith("My dream is") for post in posts)

    # Every stage ran as a container of the trainer image built here, on the real node.
    trainer = world.images["trainer"]
    pods = pods_of(world, "dreamer")
    assert sorted(pod.metadata.labels[STAGE_LABEL] for pod in pods) == ["publish", "scrape", "train"]
    for pod in pods:
        assert pod.spec.node_name == NODE_NAME
        [container] = pod.status.container_statuses
        assert container.state.terminated.exit_code == 0
        assert container.image_id == image_id(trainer.ref), (container.image_id, trainer.ref)
    # `kubectl tweetbot logs` finds the run's train pod and prints what the kubelet kept of its log.
    logs = subprocess.run([sys.executable, "-m", "tweetbot_operator.kubectl_plugin", "logs", "dreamer", "--stage", "train",
                           "-n", NAMESPACE, "--kubeconfig", str(world.env.kubeconfig)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert logs.returncode == 0 and " train blocks, " in logs.stdout, logs.stderr


def test_the_stage_pod_runs_as_non_root_on_a_read_only_root_with_cluster_dns(world):
    """The train Job's own pod template, with a command that reports its user and tries to write to `/`."""
    jobs = client.BatchV1Api(world.api).list_namespaced_job(NAMESPACE, label_selector=f"{STAGE_LABEL}=train").items
    assert jobs, "needs a bot's train Job (the first test makes one)"
    template = world.api.sanitize_for_serialization(jobs[0].spec.template)
    container = template["spec"]["containers"][0]
    container.update(name="probe", command=["python3", "-c", "import os, socket; print('uid', os.getuid(), 'home', "
                                            "os.environ['HOME'], 'dns', socket.gethostbyname('kubernetes.default'), "
                                            "flush=True); open('/probe', 'w')"])
    container.pop("resources", None)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": NAMESPACE},
           "spec": {**template["spec"], "containers": [container]}}
    core = client.CoreV1Api(world.api)
    core.create_namespaced_pod(NAMESPACE, pod)
    finished = wait_for(lambda: (p := core.read_namespaced_pod("probe", NAMESPACE)).status.phase in ("Succeeded", "Failed") and p,
                        timeout=120, what="the probe pod")
    logs = core.read_namespaced_pod_log("probe", NAMESPACE)
    assert finished.status.phase == "Failed" and finished.spec.node_name == NODE_NAME
    assert f"uid 1000 home /tmp dns {API_SERVICE_IP}" in logs  # cluster DNS, with the pod's search path
    assert "Read-only file system" in logs


def test_three_handles_make_a_cyborg(world):
    world.apply(demo_bot("cyborg", ["Sailor", "@dreamer", "gardener"], world.env, world.hub.url))
    status = world.wait("cyborg", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert [row["handle"] for row in status["data"]] == ["dreamer", "gardener", "sailor"]
    repo = world.hub.repos["demo/dreamer-gardener-sailor"]
    card = repo.head.files["README.md"].decode()
    assert "AI CYBORG" in card and "| Tweets kept |" in card


def test_a_killed_train_container_resumes_from_its_checkpoint(world):
    bot = demo_bot("resilient", ["gardener"], world.env, world.hub.url)
    bot["spec"]["training"].update(epochs=40, checkpoint={"everySteps": 20, "keep": 2})
    world.apply(bot)
    batch, core = client.BatchV1Api(world.api), client.CoreV1Api(world.api)

    def train_container_after_a_checkpoint():
        status = world.bot("resilient").get("status") or {}
        step = (status.get("progress") or {}).get("step") or 0
        pods = pods_of(world, "resilient", "train")
        listed = world.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"tweetbot/{NAMESPACE}/resilient/").get("Contents", [])
        checkpointed = any("/checkpoints/" in item["Key"] and item["Key"].endswith("manifest.json") for item in listed)
        running = pods and pods[0].status.container_statuses and pods[0].status.container_statuses[0].container_id
        return (pods[0].metadata.name, running) if running and step >= 25 and checkpointed else None

    first_pod, container_id = wait_for(train_container_after_a_checkpoint, timeout=600, interval=0.5,
                                       what="training past a checkpoint")
    kill_container(container_id)  # the node loses the container: no clean-up, no final checkpoint

    status = world.wait("resilient", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert status["stages"]["train"]["attempts"] == 2 and status["attempts"] == 1
    train_pods = pods_of(world, "resilient", "train")
    first = next(pod for pod in train_pods if pod.metadata.name == first_pod)
    assert first.status.container_statuses[0].state.terminated.exit_code == 137  # SIGKILL
    second = [pod.metadata.name for pod in train_pods if pod.metadata.name != first_pod]
    assert second and "resuming from checkpoint" in core.read_namespaced_pod_log(second[0], NAMESPACE)
    assert batch.read_namespaced_job(train_pods[0].metadata.labels["job-name"], NAMESPACE).status.failed == 1


def test_a_scheduled_bot_retrains_on_new_posts_only(world):
    from dataclasses import replace

    from tweetbot_dev.demo import synthetic_posts
    from tweetbot_dev.fakes import tweets_js

    def archive(posts):
        world.s3.put_object(Bucket=BUCKET, Key="archives/diarist/data/tweets.js", Body=tweets_js(posts).encode())

    old = synthetic_posts("diarist", 200, seed=11)
    archive(old)
    bot = demo_bot("diarist", ["diarist"], world.env, world.hub.url)
    bot["spec"].update(schedule={"cron": "* * * * *"}, historyLimit=5)
    world.apply(bot)
    status = world.wait("diarist", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    # The first run (a tick missed while it ran may already have followed it: one catch-up, at once).
    [first_run] = [entry for entry in status["history"] if entry["outcome"] == "Succeeded"]
    first, first_posts, first_commit = first_run["runId"], first_run["posts"], first_run["hubCommit"]

    def history_head(outcome, after):
        def reached():
            history = (world.bot("diarist").get("status") or {}).get("history") or []
            return history[0] if history and history[0]["outcome"] == outcome and history[0]["runId"] != after else None
        return reached

    # A tick finds the archive as it was: no train Job, the model stays the first run's.
    idle = wait_for(history_head("UpToDate", first), timeout=300, what="a tick without new posts")
    assert idle["newPosts"] == 0 and idle["modelRunId"] == first and idle["posts"] == first_posts
    jobs = client.BatchV1Api(world.api).list_namespaced_job(NAMESPACE, label_selector="huggingtweets.dev/bot=diarist").items
    assert not [job for job in jobs if job.metadata.labels["huggingtweets.dev/run"] == idle["runId"]
                and job.metadata.labels[STAGE_LABEL] == "train"]

    # Thirty new posts: the next tick trains on the merged posts and publishes a second commit.
    new = [replace(post, id=2 * 10**9 + index) for index, post in enumerate(synthetic_posts("diarist", 30, seed=12))]
    archive(new + old)
    trained = wait_for(history_head("Succeeded", first), timeout=900, what="a tick that trains")
    status = world.bot("diarist")["status"]
    assert trained["newPosts"] > 0 and trained["modelRunId"] == trained["runId"]
    assert trained["posts"] == idle["posts"] + trained["newPosts"]
    if status["runId"] == trained["runId"]:  # no later tick has started yet
        [row] = status["data"]
        assert row["downloaded"] == 230 and row["kept"] == first_posts + trained["newPosts"]
    repo = world.hub.repos["demo/diarist"]
    assert [commit.id for commit in repo.history("main")][-2:] == [first_commit, trained["hubCommit"]]


def test_two_pods_train_one_model_through_cluster_dns(world):
    """A training on two nodes of one CPU each: an Indexed Job whose pods meet at <job>-0.<job> (the headless
    Service the operator made, cluster DNS on the real node) and train one model."""
    bot = demo_bot("pair", ["gardener"], world.env, world.hub.url)
    bot["spec"]["resources"].update(nodes=2, cpu="600m")
    bot["spec"]["training"]["checkpoint"] = {"everySteps": 5, "keep": 2}
    bot["spec"]["output"].pop("hub")
    world.apply(bot)
    status = world.wait("pair", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert status["metrics"]["steps"] > 0 and status["metrics"]["evalLoss"] > 0
    pods = pods_of(world, "pair", "train")
    assert sorted(pod.spec.hostname for pod in pods) == [f"{status['stages']['train']['jobName']}-{index}" for index in range(2)]
    for pod in pods:
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    listed = world.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"tweetbot/{NAMESPACE}/pair/{status['runId']}/checkpoints/")
    parts = {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []) if "/nodes/" in item["Key"]}
    assert parts == {"0.json", "1.json"}  # both pods uploaded their part of each checkpoint


def test_a_gang_whose_pod_is_killed_after_a_checkpoint_resumes_both_pods_from_it(world):
    """One of two training pods dies after a checkpoint both completed: the attempt fails as a whole, and the
    gang the operator starts again resumes both ranks from that checkpoint to the uninterrupted step count."""
    bot = demo_bot("pair-killed", ["gardener"], world.env, world.hub.url)
    bot["spec"]["resources"].update(nodes=2, cpu="600m")
    bot["spec"]["training"].update(epochs=20, checkpoint={"everySteps": 10, "keep": 2})
    bot["spec"]["output"].pop("hub")
    world.apply(bot)
    prefix = f"tweetbot/{NAMESPACE}/pair-killed/"

    def pod_1_after_a_checkpoint():
        progress = (world.bot("pair-killed").get("status") or {}).get("progress") or {}
        listed = world.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        checkpointed = any("/checkpoints/" in item["Key"] and item["Key"].endswith("/manifest.json") for item in listed)
        pods = {pod.metadata.labels.get("batch.kubernetes.io/job-completion-index"): pod for pod in pods_of(world, "pair-killed", "train")}
        statuses = pods["1"].status.container_statuses if "1" in pods else None
        running = statuses and statuses[0].state.running and statuses[0].container_id
        return (running, progress["totalSteps"]) if running and checkpointed and progress.get("step", 0) >= 12 else None

    container_id, total_steps = wait_for(pod_1_after_a_checkpoint, timeout=600, interval=0.5, what="both pods past a checkpoint")
    first_job = pods_of(world, "pair-killed", "train")[0].metadata.owner_references[0].uid
    kill_container(container_id)

    status = world.wait("pair-killed", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    train = status["stages"]["train"]
    # Pod 0 fails a moment later (its peer's connection reset) and the kubelet may report both in one update:
    # the Job controller names whichever it matched first.
    assert train["restarts"] == 1 and train["failedPod"] in (0, 1)
    assert status["metrics"]["steps"] == total_steps  # what the uninterrupted run would have done
    core = client.CoreV1Api(world.api)
    pods = pods_of(world, "pair-killed", "train")
    assert len(pods) == 2 and all(pod.metadata.owner_references[0].uid != first_job for pod in pods)
    for pod in pods:
        assert "resuming from checkpoint" in core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE)
