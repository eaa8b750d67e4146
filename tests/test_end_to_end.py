"""End to end on one machine: `kubectl apply` a TweetBot and get a published model that writes posts.

The chart is installed with Helm; the operator and every stage Job run as real processes on the local node
agent's node; S3, the source archive and the Hub are local servers; DeepSpeed trains on CPU.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
from kubernetes import client

from tweetbot_dev.binaries import cache_root
from tweetbot_dev.demo import BUCKET, NAMESPACE, Demo, demo_bot
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


def test_one_handle_from_apply_to_generated_posts(world):
    world.apply(demo_bot("dreamer", ["dreamer"], world.env, world.hub.url))
    status = world.wait("dreamer", timeout=600)
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


def test_three_handles_make_a_cyborg(world):
    world.apply(demo_bot("cyborg", ["Sailor", "@dreamer", "gardener"], world.env, world.hub.url))
    status = world.wait("cyborg", timeout=600)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert [row["handle"] for row in status["data"]] == ["dreamer", "gardener", "sailor"]
    repo = world.hub.repos["demo/dreamer-gardener-sailor"]
    card = repo.head.files["README.md"].decode()
    assert "AI CYBORG" in card and "| Tweets kept |" in card


def test_a_killed_train_pod_resumes_from_its_checkpoint(world):
    bot = demo_bot("resilient", ["gardener"], world.env, world.hub.url)
    bot["spec"]["training"].update(epochs=40, checkpoint={"everySteps": 20, "keep": 2})
    world.apply(bot)
    batch, core = client.BatchV1Api(world.api), client.CoreV1Api(world.api)

    def train_pod_after_a_checkpoint():
        status = world.bot("resilient").get("status") or {}
        step = (status.get("progress") or {}).get("step") or 0
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"{STAGE_LABEL}=train,huggingtweets.dev/bot=resilient").items
        listed = world.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"tweetbot/{NAMESPACE}/resilient/").get("Contents", [])
        checkpointed = any("/checkpoints/" in item["Key"] and item["Key"].endswith("manifest.json") for item in listed)
        return pods[0].metadata.name if pods and step >= 25 and checkpointed else None

    first_pod = wait_for(train_pod_after_a_checkpoint, timeout=300, interval=0.5, what="training past a checkpoint")
    pid = wait_for(lambda: world.agent.pid_of(first_pod), what="the train process")
    os.killpg(pid, signal.SIGKILL)  # the node loses the pod: no clean-up, no final checkpoint

    status = world.wait("resilient", timeout=900)
    assert status["phase"] == "Succeeded", status.get("lastError")
    assert status["stages"]["train"]["attempts"] == 2 and status["attempts"] == 1
    train_pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"{STAGE_LABEL}=train,huggingtweets.dev/bot=resilient").items
    second = [pod.metadata.name for pod in train_pods if pod.metadata.name != first_pod]
    assert second and "resuming from checkpoint" in world.agent.logs[second[0]]
    assert batch.read_namespaced_job(train_pods[0].metadata.labels["job-name"], NAMESPACE).status.failed == 1
