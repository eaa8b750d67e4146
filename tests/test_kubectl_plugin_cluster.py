"""`kubectl tweetbot` against the real control plane and the real S3 server. No operator runs: each test writes
the bot's status itself through the status subresource, as the operator would, and puts the run's files in S3
in the layout `S3Layout` gives them. `get` and `wait` run as the installed entry point does, in a process of
their own with KUBECONFIG set."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tweetbot_operator import kubectl_plugin
from tweetbot_operator.botview import Exit
from tweetbot_operator.names import RERUN_ANNOTATION
from tweetbot_trainer.contract import BOT_LABEL, RUN_LABEL, STAGE_LABEL, S3Layout

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "huggingtweets.dev", "v1alpha1", "tweetbots"
RUN = "a1b2c3d4e5f60718"
MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture(scope="module")
def crd(dev_env):
    subprocess.run([str(dev_env.cluster.kubectl), "--kubeconfig", str(dev_env.kubeconfig), "apply", "-f", str(REPO / "crds")],
                   check=True, capture_output=True)


@pytest.fixture
def custom(api_client, crd):
    return client.CustomObjectsApi(api_client)


def create_bot(custom, namespace, name, bucket="bots", endpoint=None) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TweetBot", "metadata": {"name": name},
            "spec": {"handles": ["dreamer"], "source": {"xArchive": {"uri": "s3://archives/{handle}/tweets.js"}},
                     "output": {"s3": {"bucket": bucket, **({"endpoint": endpoint} if endpoint else {})}}}}
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def write_status(custom, namespace, name, ready=False, stalled=False, reason="TrainRunning", message="", **status) -> dict:
    """The status the operator writes, with kstatus conditions for the bot's current generation."""
    generation = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["metadata"]["generation"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [
        {"type": "Ready", "status": str(ready), "reason": reason, "message": message, "lastTransitionTime": now,
         "observedGeneration": generation},
        {"type": "Stalled", "status": str(stalled), "reason": reason if stalled else "NotStalled",
         "message": message if stalled else "", "lastTransitionTime": now, "observedGeneration": generation},
    ]
    body = {"status": {"observedGeneration": generation, "runId": RUN, "conditions": conditions, **status}}
    return custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH)


def plugin_env(dev_env, **extra: str) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(dev_env.kubeconfig),
            "PYTHONPATH": os.pathsep.join(str(REPO / part) for part in ("operator", "trainer", "hack")), **extra}


def plugin(dev_env, *args, timeout=120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kubectl tweetbot ARGS` as kubectl runs the plugin: a process of its own, the kubeconfig from the environment."""
    return subprocess.run([sys.executable, "-m", "tweetbot_operator.kubectl_plugin", *args],
                          env=plugin_env(dev_env, **(env or {})), capture_output=True, text=True, timeout=timeout)


def in_process(dev_env, capsys, *args) -> tuple[int, str, str]:
    code = kubectl_plugin.main([*args, "--kubeconfig", str(dev_env.kubeconfig)])
    out, err = capsys.readouterr()
    return code, out, err


# --- get, wait, rerun --------------------------------------------------------------------------------------


def test_get_shows_phase_progress_eta_loss_and_hub(dev_env, custom, namespace):
    create_bot(custom, namespace, "dreamer")
    write_status(custom, namespace, "dreamer", phase="Training",
                 progress={"step": 40, "totalSteps": 100, "summary": "train 40% (40/100 steps)", "etaSeconds": 754, "loss": 3.14159})
    create_bot(custom, namespace, "sailor")
    write_status(custom, namespace, "sailor", ready=True, reason="Succeeded", phase="Succeeded",
                 progress={"summary": "3/3"}, metrics={"evalLoss": 1.23456},
                 artifacts={"hubUrl": "https://huggingface.co/demo/sailor", "modelUri": f"s3://bots/x/{RUN}/final/"})

    listed = plugin(dev_env, "get", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "ETA", "LOSS", "HUB", "AGE"]
    cells = {row.split()[0]: row.split()[1:6] for row in rows}
    assert cells == {"dreamer": ["Training", "train_40%_(40/100_steps)", "12m", "3.142", "-"],
                     "sailor": ["Succeeded", "3/3", "-", "1.235", "https://huggingface.co/demo/sailor"]}

    one = plugin(dev_env, "get", "sailor", "-n", namespace, "-o", "json")
    assert one.returncode == 0 and json.loads(one.stdout)["status"]["metrics"]["evalLoss"] == 1.23456
    as_yaml = yaml.safe_load(plugin(dev_env, "get", "-n", namespace, "-o", "yaml").stdout)
    assert as_yaml["kind"] == "List" and sorted(item["metadata"]["name"] for item in as_yaml["items"]) == ["dreamer", "sailor"]
    everywhere = plugin(dev_env, "get", "-A")
    assert everywhere.returncode == 0 and everywhere.stdout.split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == [namespace, "dreamer"] for line in everywhere.stdout.splitlines())

    missing = plugin(dev_env, "get", "nobody", "-n", namespace)
    assert missing.returncode == Exit.ERROR and "not found" in missing.stderr


def test_wait_exits_by_what_the_bot_became(dev_env, custom, namespace):
    for name in ("done", "broken", "stuck", "slow"):
        create_bot(custom, namespace, name)
    write_status(custom, namespace, "done", ready=True, reason="Succeeded", phase="Succeeded")
    write_status(custom, namespace, "broken", stalled=True, reason="StageFailed", phase="Failed",
                 message="train: out of GPU memory (exit 21)", lastError="train: out of GPU memory (exit 21)")
    write_status(custom, namespace, "stuck", stalled=True, reason="SecretMissing", phase="Pending",
                 message="Secret x-api is missing", lastError="Secret x-api is missing")
    write_status(custom, namespace, "slow", phase="Training")

    started = time.monotonic()
    assert plugin(dev_env, "wait", "done", "-n", namespace).returncode == Exit.OK
    broken = plugin(dev_env, "wait", "broken", "-n", namespace)
    assert broken.returncode == Exit.FAILED and "out of GPU memory" in broken.stderr
    stuck = plugin(dev_env, "wait", "stuck", "-n", namespace)
    assert stuck.returncode == Exit.STALLED and "SecretMissing" in stuck.stderr and "x-api" in stuck.stderr
    timed = plugin(dev_env, "wait", "slow", "-n", namespace, "--timeout", "2s")
    assert timed.returncode == Exit.TIMEOUT and "Training" in timed.stderr
    assert time.monotonic() - started < 60

    # The watch sees the bot succeed while it waits.
    waiting = subprocess.Popen([sys.executable, "-m", "tweetbot_operator.kubectl_plugin", "wait", "slow", "-n", namespace,
                                "--timeout", "60s"], env=plugin_env(dev_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(3)
        assert waiting.poll() is None
        write_status(custom, namespace, "slow", phase="Training", progress={"summary": "train 99%"})
        time.sleep(1)
        assert waiting.poll() is None
        became_ready = time.monotonic()
        write_status(custom, namespace, "slow", ready=True, reason="Succeeded", phase="Succeeded")
        out, err = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == Exit.OK, err
    assert "Succeeded" in out and time.monotonic() - became_ready < 10


def test_rerun_sets_the_annotation_and_wait_waits_for_its_run(dev_env, custom, namespace, capsys):
    create_bot(custom, namespace, "again")
    write_status(custom, namespace, "again", ready=True, reason="Succeeded", phase="Succeeded")
    code, out, _ = in_process(dev_env, capsys, "rerun", "again", "-n", namespace)
    value = out.strip()
    assert code == 0 and value.endswith("Z") and value.startswith(time.strftime("%Y-%m-%dT", time.gmtime()))
    bot = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "again")
    assert bot["metadata"]["annotations"][RERUN_ANNOTATION] == value
    # The Succeeded status is of the run before: wait goes on until the operator answers the new value.
    assert in_process(dev_env, capsys, "wait", "again", "-n", namespace, "--timeout", "2s")[0] == Exit.TIMEOUT
    write_status(custom, namespace, "again", ready=True, reason="Succeeded", phase="Succeeded", rerun=value)
    assert in_process(dev_env, capsys, "wait", "again", "-n", namespace, "--timeout", "10s")[0] == Exit.OK


# --- logs --------------------------------------------------------------------------------------------------


def stage_job(batch, namespace, bot, stage, pods=1) -> str:
    name = f"{bot}-{RUN[:5]}-{stage}"
    labels = {BOT_LABEL: bot, RUN_LABEL: RUN, STAGE_LABEL: stage}
    spec = {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": stage, "image": "tweetbot-trainer:test", "command": ["true"]}]}}}
    if pods > 1:
        spec.update(completionMode="Indexed", completions=pods, parallelism=pods)
    batch.create_namespaced_job(namespace, {"metadata": {"name": name, "labels": labels}, "spec": spec})
    return name


def test_logs_find_the_stage_pod_and_say_why_there_is_no_log(dev_env, custom, api_client, namespace, capsys):
    from tweetbot_dev.polling import wait_for

    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    create_bot(custom, namespace, "gang")
    job = stage_job(batch, namespace, "gang", "train", pods=2)
    write_status(custom, namespace, "gang", phase="Training",
                 stages={"scrape": {"jobName": "gang-a1b2c-scrape", "state": "Succeeded"},
                         "train": {"jobName": job, "state": "Running"}})
    wait_for(lambda: len([p for p in core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
                          if p.status.phase == "Running"]) == 2, timeout=60, what="the gang's two pods running")

    # kwok's nodes serve no logs: the plugin names the pod it chose (index 0, the running stage's) and says so.
    code, out, err = in_process(dev_env, capsys, "logs", "gang", "-n", namespace)
    assert code == Exit.UNAVAILABLE and out == ""
    assert f"the log of pod {job}-0-" in err and "cannot be read" in err
    code, _, err = in_process(dev_env, capsys, "logs", "gang", "-n", namespace, "--all-pods")
    assert code == Exit.UNAVAILABLE and f"pod {job}-0-" in err

    # The scrape Job is gone (its TTL): the plugin says where the results are.
    write_status(custom, namespace, "gang", phase="Training", artifacts={"datasetUri": f"s3://bots/x/{RUN}/data/dataset.jsonl"})
    code, _, err = in_process(dev_env, capsys, "logs", "gang", "-n", namespace, "--stage", "scrape")
    assert code == Exit.UNAVAILABLE
    assert f"the scrape pods of run {RUN} were cleaned up (ttlSecondsAfterFinished); the dataset is in s3://bots/x/{RUN}/data/dataset.jsonl" in err

    batch.delete_namespaced_job(job, namespace, propagation_policy="Background")
    write_status(custom, namespace, "gang", ready=True, reason="Succeeded", phase="Succeeded",
                 stages={"train": {"jobName": job, "state": "Succeeded"}}, artifacts={"modelUri": f"s3://bots/x/{RUN}/final/"})
    wait_for(lambda: not batch.list_namespaced_job(namespace).items, timeout=30, what="the Job deleted")
    code, _, err = in_process(dev_env, capsys, "logs", "gang", "-n", namespace, "--stage", "train")
    assert code == Exit.UNAVAILABLE
    assert f"the train pods of run {RUN} were cleaned up (ttlSecondsAfterFinished); the model is in s3://bots/x/{RUN}/final/" in err


def test_logs_follow_every_pod_of_a_gang(dev_env, custom, api_client, namespace, tmp_path):
    """`logs -f --all-pods`: each pod's lines as they come, prefixed with its index. kwok serves a pod's log
    from the file a `Logs` object (kwok's CRD) names, in the CRI format a kubelet reads, and follows it for as
    long as the client reads: the test ends the plugin itself."""
    from tweetbot_dev.polling import wait_for

    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
    create_bot(custom, namespace, "chorus")
    job = stage_job(batch, namespace, "chorus", "train", pods=2)
    write_status(custom, namespace, "chorus", phase="Training", stages={"train": {"jobName": job, "state": "Running"}})
    wait_for(lambda: len([p for p in core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
                          if p.status.phase == "Running"]) == 2, timeout=60, what="the gang's two pods running")
    pods = {int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): p.metadata.name
            for p in core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items}

    def cri(text: str) -> str:
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}.000000000Z stdout F {text}\n"

    files = {index: tmp_path / f"{index}.log" for index in pods}
    for index, name in pods.items():
        files[index].write_text(cri(f"rank {index} starts"))
        custom.create_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", namespace, "logs", {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs", "metadata": {"name": name},
            "spec": {"logs": [{"containers": ["train"], "logsFile": str(files[index]), "follow": True}]}})

    def served(name: str) -> bool:
        try:
            return "starts" in core.read_namespaced_pod_log(name, namespace, container="train")
        except client.ApiException:
            return False

    wait_for(lambda: all(served(name) for name in pods.values()), timeout=30, what="kwok serving both pods' logs")

    following = subprocess.Popen([sys.executable, "-m", "tweetbot_operator.kubectl_plugin", "logs", "chorus", "-n", namespace,
                                  "-f", "--all-pods"], env=plugin_env(dev_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in following.stdout], daemon=True).start()
    seen: list[str] = []

    def saw(line: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return line in seen

    try:
        wait_for(lambda: saw("[0] rank 0 starts") and saw("[1] rank 1 starts"), timeout=60, what="both pods' first lines")
        assert following.poll() is None  # following, not done
        with files[1].open("a") as log:
            log.write(cri("rank 1 step 1") + cri("rank 1 step 2"))
        with files[0].open("a") as log:
            log.write(cri("rank 0 step 1"))
        wait_for(lambda: saw("[1] rank 1 step 2") and saw("[0] rank 0 step 1"), timeout=30, what="the lines written later")
    finally:
        following.kill()
        _, err = following.communicate(timeout=30)
    assert all(line.startswith(("[0] rank 0 ", "[1] rank 1 ")) for line in seen), (seen, err)
    assert seen.index("[1] rank 1 step 1") < seen.index("[1] rank 1 step 2")


# --- S3: samples, download, generate -----------------------------------------------------------------------


@pytest.fixture
def s3_env(dev_env, monkeypatch):
    """The AWS chain's variables pointing at the dev S3 server, as a user's shell would."""
    for name, value in {"AWS_ENDPOINT_URL": dev_env.s3_endpoint, "AWS_ACCESS_KEY_ID": dev_env.s3_access_key,
                        "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


def put_model(s3, bucket, namespace, bot, files: dict[str, bytes]) -> str:
    """The train stage's final model: its files, then the manifest last."""
    layout = S3Layout(bucket=bucket, prefix="tweetbot", namespace=namespace, bot=bot, run_id=RUN)
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=layout.final_model + name, Body=data)
    manifest = {"files": {name: {"bytes": len(data)} for name, data in files.items()}}
    s3.put_object(Bucket=bucket, Key=layout.final_model + "manifest.json", Body=json.dumps(manifest).encode())
    return layout.uri("final") + "/"


def test_samples_and_download_read_the_final_model(dev_env, custom, namespace, new_bucket, s3_env, tmp_path, capsys):
    s3, bucket = new_bucket("plugin-download")
    create_bot(custom, namespace, "dreamer", bucket=bucket)
    files = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": os.urandom(300_000),
             "samples.json": json.dumps(["My dream is a boat", "My dream is\nto sail"]).encode(), "tokenizer/vocab.json": b"{}"}
    model_uri = put_model(s3, bucket, namespace, "dreamer", files)
    write_status(custom, namespace, "dreamer", ready=True, reason="Succeeded", phase="Succeeded", artifacts={"modelUri": model_uri})

    code, out, _ = in_process(dev_env, capsys, "samples", "dreamer", "-n", namespace)
    assert code == 0 and out.splitlines() == ["My dream is a boat", "My dream is\\nto sail"]

    target = tmp_path / "model"
    code, out, _ = in_process(dev_env, capsys, "download", "dreamer", str(target), "-n", namespace)
    assert code == 0 and "4 files" in out
    assert {path.relative_to(target).as_posix(): path.read_bytes() for path in target.rglob("*") if path.is_file()
            and path.name != "manifest.json"} == files
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # nothing of the download's own left beside it

    code, _, err = in_process(dev_env, capsys, "download", "dreamer", str(target), "-n", namespace)
    assert code == Exit.ERROR and "not an empty directory" in err
    (target / "stale.txt").write_text("old")
    code, _, _ = in_process(dev_env, capsys, "download", "dreamer", str(target), "-n", namespace, "--force")
    assert code == 0 and not (target / "stale.txt").exists() and (target / "config.json").exists()
    code, _, err = in_process(dev_env, capsys, "download", "dreamer", str(tmp_path / "small"), "-n", namespace, "--max-bytes", "1000")
    assert code == Exit.ERROR and "more than --max-bytes" in err and not (tmp_path / "small").exists()

    # A bot without a model yet, and a model without its manifest (not complete).
    create_bot(custom, namespace, "young", bucket=bucket)
    write_status(custom, namespace, "young", phase="Scraping")
    code, _, err = in_process(dev_env, capsys, "samples", "young", "-n", namespace)
    assert code == Exit.UNAVAILABLE and "no model yet" in err
    write_status(custom, namespace, "young", phase="Training", artifacts={"modelUri": f"s3://{bucket}/nothing/here/"})
    code, _, err = in_process(dev_env, capsys, "download", "young", str(tmp_path / "none"), "-n", namespace)
    assert code == Exit.UNAVAILABLE and "no complete model" in err
    for secret in (dev_env.s3_secret_key, dev_env.s3_access_key):
        assert secret not in err


def test_generate_writes_posts_with_the_model_in_s3(dev_env, custom, namespace, new_bucket, s3_env, tmp_path):
    from tweetbot_dev.tiny_model import build_tiny_gpt2

    s3, bucket = new_bucket("plugin-generate")
    model = build_tiny_gpt2(tmp_path / "tiny", ["My dream is to sail the seas", "the sea is calm today", "dream big"] * 20)
    files = {path.relative_to(model).as_posix(): path.read_bytes() for path in model.rglob("*") if path.is_file()}
    create_bot(custom, namespace, "writer", bucket=bucket)
    write_status(custom, namespace, "writer", ready=True, reason="Succeeded", phase="Succeeded",
                 artifacts={"modelUri": put_model(s3, bucket, namespace, "writer", files)})
    # In a process of its own, as a user runs it: the libraries' own prints (DeepSpeed's) stay off stdout.
    generated = plugin(dev_env, "generate", "writer", "My dream is", "-n", namespace, "--num", "2", "--max-new-tokens", "8",
                       "--seed", "0", timeout=300)
    assert generated.returncode == 0, generated.stderr
    posts = generated.stdout.splitlines()
    assert len(posts) == 2 and all(post.startswith("My dream is") for post in posts)


def test_the_bots_own_s3_endpoint_is_used_only_when_the_user_names_it(dev_env, custom, namespace, new_bucket, s3_env,
                                                                       monkeypatch, capsys):
    """The spec is the bot author's: the user's credentials sign requests only to an endpoint the user chose."""
    s3, bucket = new_bucket("plugin-endpoint")
    create_bot(custom, namespace, "elsewhere", bucket=bucket, endpoint=dev_env.s3_endpoint)
    model_uri = put_model(s3, bucket, namespace, "elsewhere", {"samples.json": json.dumps(["My dream is a boat"]).encode()})
    write_status(custom, namespace, "elsewhere", ready=True, reason="Succeeded", phase="Succeeded",
                 artifacts={"modelUri": model_uri})
    monkeypatch.delenv("AWS_ENDPOINT_URL")

    code, out, err = in_process(dev_env, capsys, "samples", "elsewhere", "-n", namespace)
    assert code == Exit.ERROR and out == ""
    assert f"spec.output.s3.endpoint {dev_env.s3_endpoint}" in err and f"--s3-endpoint {dev_env.s3_endpoint}" in err
    code, out, _ = in_process(dev_env, capsys, "samples", "elsewhere", "-n", namespace, "--s3-endpoint", dev_env.s3_endpoint)
    assert code == 0 and out.splitlines() == ["My dream is a boat"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_env.s3_endpoint)
    assert in_process(dev_env, capsys, "samples", "elsewhere", "-n", namespace)[0] == 0


def test_generate_loads_from_the_hub_its_hub_url_names(dev_env, custom, namespace, tmp_path):
    """A bot published to a Hub of its own is loaded from there, anonymously: the user's HF_TOKEN goes only to
    the Hub the user configured (HF_ENDPOINT), where a same-named repo is not the bot's."""
    from huggingface_hub import HfApi

    from tweetbot_dev.fake_hub import FakeHub
    from tweetbot_dev.tiny_model import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "tiny", ["My dream is to sail the seas", "the sea is calm today", "dream big"] * 20)
    with FakeHub(tokens={"hf_mine": "alice"}, orgs={"alice": ["tweetbots"]}) as mine, \
            FakeHub(tokens={"hf_theirs": "mallory"}, orgs={"mallory": ["tweetbots"]}) as theirs:
        published = [(mine, "hf_mine", "tweetbots/dreamer", False), (theirs, "hf_theirs", "tweetbots/dreamer", False),
                     (mine, "hf_mine", "tweetbots/secret", True)]
        for hub, token, repo, private in published:
            api = HfApi(endpoint=hub.url, token=token)
            api.create_repo(repo, private=private)
            api.upload_folder(repo_id=repo, folder_path=model, commit_message="Publish")
        for hub in (mine, theirs):
            hub.callers.clear()
        env = {"HF_ENDPOINT": mine.url, "HF_TOKEN": "hf_mine", "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        generate = ("My dream is", "-n", namespace, "--from", "hub", "--num", "1", "--max-new-tokens", "4", "--seed", "0")

        create_bot(custom, namespace, "elsewhere")
        write_status(custom, namespace, "elsewhere", ready=True, reason="Succeeded", phase="Succeeded",
                     artifacts={"hubUrl": f"{theirs.url}/tweetbots/dreamer"})
        elsewhere = plugin(dev_env, "generate", "elsewhere", *generate, env=env, timeout=300)
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert elsewhere.stdout.startswith("My dream is")
        assert theirs.callers and all(user is None for user, _ in theirs.callers), theirs.callers
        assert mine.callers == []
        assert f"{theirs.url} is not your Hub" in elsewhere.stderr and "hf_mine" not in elsewhere.stderr

        create_bot(custom, namespace, "home")
        write_status(custom, namespace, "home", ready=True, reason="Succeeded", phase="Succeeded",
                     artifacts={"hubUrl": f"{mine.url}/tweetbots/secret"})
        home = plugin(dev_env, "generate", "home", *generate, env=env, timeout=300)
        assert home.returncode == 0, home.stderr
        assert mine.callers and all(user == "alice" for user, _ in mine.callers), mine.callers
        assert "is not your Hub" not in home.stderr
