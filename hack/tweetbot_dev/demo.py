"""`tweetbot-dev demo`: the whole product on one machine, offline.

Local control plane and S3, both images built from the repository's Dockerfiles, the chart installed with
Helm as a user would, the operator and every stage Job run as containers on the real node (kubelet,
containerd, runc), a synthetic X archive as the source, a tiny GPT-2 built locally as the base model, and a
local Hub-compatible server as the Hub.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import boto3

from tweetbot_operator.spec import SECRET_OPT_IN_LABEL

from .binaries import cache_root
from .devenv import DevEnvironment
from .fake_hub import FakeHub
from .fakes import FakePost, tweets_js
from .images import ensure_image
from .tiny_model import build_tiny_gpt2

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tweetbot-demo"
HUB_TOKEN, HUB_USER = "hf_demo_token", "demo"
NAMESPACE = "default"

# Synthetic posts of made-up people: nobody's real words.
SUBJECTS = ["my dream is", "today I learned", "the best part of the morning is", "someday I will", "I still think",
            "nobody tells you that", "the secret to good coffee is", "every cat knows"]
ENDINGS = ["to sail a small boat across a quiet sea", "that the moon follows you home", "a walk before the rain",
           "to plant a garden full of tomatoes", "that kindness is a habit", "to read every book in the library",
           "to build a robot that waters the plants", "a warm cup and an open window", "that naps are underrated",
           "to learn the names of all the birds"]


def synthetic_posts(handle: str, count: int, seed: int) -> list[FakePost]:
    rng = random.Random(seed)
    posts = []
    for i in range(count):
        if rng.random() < 0.08:
            text, repost = "what a great thread about gardening", True
        elif rng.random() < 0.08:
            text, repost = rng.choice(["lol", "yes!", "good morning"]), False
        else:
            text = f"{rng.choice(SUBJECTS)} {rng.choice(ENDINGS)}"
            if rng.random() < 0.2:
                text += f" https://example.com/{i}"
            if rng.random() < 0.15:
                text = f"@friend_{i % 7} {text} #{handle}"
            repost = False
        posts.append(FakePost(10**9 - i, text, repost))
    return posts


def demo_bot(name: str, handles: list[str], env: DevEnvironment, hub_url: str) -> dict:
    return {
        "apiVersion": "huggingtweets.dev/v1alpha1", "kind": "TweetBot", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "handles": handles,
            "source": {"xArchive": {"uri": f"s3://{BUCKET}/archives/{{handle}}/data/tweets.js"}},
            "model": {"name": f"s3://{BUCKET}/base/tiny-gpt2/"},
            "training": {"epochs": 6, "learningRate": 3e-3, "batchSize": 8, "blockSize": 64,
                         "checkpoint": {"everySteps": 20, "keep": 2}},
            # The real node has this machine's 2 cores; the operator's pod requests a tenth of one.
            "resources": {"gpus": 0, "cpu": "1500m", "memory": "4Gi"},
            "output": {"s3": {"bucket": BUCKET, "endpoint": env.s3_endpoint, "credentialsSecretRef": {"name": "demo-s3"}},
                       "hub": {"endpoint": hub_url, "tokenSecretRef": {"name": "demo-hub"}}},
            "backoffLimit": 2,
        },
    }


class Demo:
    """Everything the demo runs, so tests can drive the same world step by step."""

    def __init__(self, home: Path, log=print):
        self.home, self.log = home, log
        self.env: DevEnvironment | None = None
        self.hub: FakeHub | None = None
        self.timings: dict[str, float] = {}

    def up(self, handles_posts: dict[str, int], owner_pid: int | None) -> None:
        started = time.monotonic()
        for name in ("operator", "trainer"):  # built before the cluster starts, so they do not share the cores
            ensure_image(name, self.log)
        self.timings["images"] = time.monotonic() - started
        self.env = DevEnvironment.up(self.home, log=self.log, owner_pid=owner_pid, nodes=[], real_node=True)
        loading = time.monotonic()
        self.images = self.env.load_images(self.log)
        self.timings["load"] = time.monotonic() - loading
        from kubernetes import config

        self.api = config.new_client_from_config(config_file=str(self.env.kubeconfig))
        self.hub = FakeHub(tokens={HUB_TOKEN: HUB_USER}, orgs={}, host=self.env.host).__enter__()
        self.s3 = boto3.client("s3", endpoint_url=self.env.s3_endpoint, aws_access_key_id=self.env.s3_access_key,
                               aws_secret_access_key=self.env.s3_secret_key, region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        corpus = []
        for seed, (handle, count) in enumerate(sorted(handles_posts.items())):
            posts = synthetic_posts(handle, count, seed)
            corpus += [post.text for post in posts]
            self.s3.put_object(Bucket=BUCKET, Key=f"archives/{handle}/data/tweets.js", Body=tweets_js(posts).encode())
        model = build_tiny_gpt2(self.home / "tiny-gpt2", corpus)
        for path in model.iterdir():
            self.s3.upload_file(str(path), BUCKET, f"base/tiny-gpt2/{path.name}")
        self.kubectl("create", "secret", "generic", "demo-hub", f"--from-literal=token={HUB_TOKEN}", "-n", NAMESPACE)
        self.kubectl("create", "secret", "generic", "demo-s3", "-n", NAMESPACE,
                     f"--from-literal=AWS_ACCESS_KEY_ID={self.env.s3_access_key}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={self.env.s3_secret_key}")
        self.kubectl("label", "secret", "demo-hub", "demo-s3", f"{SECRET_OPT_IN_LABEL}=true", "-n", NAMESPACE)
        repository, tag = self.images["operator"].ref.rsplit(":", 1)
        self.helm("install", "tweetbot", str(REPO / "charts" / "tweetbot-operator"), "--namespace", "tweetbot-system",
                  "--create-namespace", "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                  "--set", "image.pullPolicy=Never", "--set", f"trainer.image={self.images['trainer'].ref}",
                  "--set", "trainer.imagePullPolicy=Never", "--set", "resyncSeconds=5", "--set", "logFormat=plain",
                  "--set-json", f"s3.endpoints={json.dumps([self.env.s3_endpoint])}",
                  "--wait", "--timeout", "3m")
        self.kubectl("wait", "--for=condition=Established", "crd/tweetbots.huggingtweets.dev", "--timeout=60s")
        self.log(f"ready in {time.monotonic() - started:.0f}s (images {self.timings['images']:.0f}s, loading them into the node "
                 f"{self.timings['load']:.0f}s): cluster with a real node, S3 at {self.env.s3_endpoint}, Hub at {self.hub.url}")

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self._run("kubectl", args, input)

    def helm(self, *args: str) -> str:
        return self._run("helm", args, None)

    def _run(self, tool: str, args, input) -> str:
        result = subprocess.run([str(self.env.bin_dir / tool), "--kubeconfig", str(self.env.kubeconfig), *args],
                                input=input, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, bot: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(bot))

    def bot(self, name: str) -> dict:
        return json.loads(self.kubectl("get", "tweetbot", name, "-n", NAMESPACE, "-o", "json"))

    def wait(self, name: str, timeout: float = 1800) -> dict:
        """Follow the bot, printing each phase and progress change, until it succeeds or fails."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            status = self.bot(name).get("status") or {}
            shown = (status.get("phase"), (status.get("progress") or {}).get("summary"))
            if shown != last and shown[0]:
                eta = (status.get("progress") or {}).get("etaSeconds")
                self.log(f"  {shown[0]:<11} {shown[1] or ''}" + (f"  ETA {eta}s" if eta is not None else ""))
                last = shown
            if status.get("phase") in ("Succeeded", "Failed"):
                return status
            time.sleep(1)
        raise TimeoutError(f"{name} did not finish within {timeout:.0f}s")

    def generate(self, repo_id: str, count: int = 3) -> list[str]:
        """Load the published model from the local Hub, as anyone would, and write a few posts."""
        from huggingface_hub import snapshot_download
        from transformers import pipeline, set_seed

        path = snapshot_download(repo_id, endpoint=self.hub.url, token=False, cache_dir=str(self.home / "hub-cache"))
        set_seed(0)
        generator = pipeline("text-generation", model=path, device="cpu")
        return [out["generated_text"] for out in generator("My dream is", num_return_sequences=count, max_new_tokens=30)]

    def stage_pods(self, name: str) -> list[dict]:
        """Each stage of the bot's run: its pod's node and image, and where the pod's time went, from the Job's and
        the pod's own timestamps (whole seconds, as the API server keeps them)."""
        from kubernetes import client
        from tweetbot_trainer.timing import timings_from_log

        batch, core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        rows = []
        for job in batch.list_namespaced_job(NAMESPACE, label_selector=f"huggingtweets.dev/bot={name}").items:
            pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={job.metadata.name}").items
            for pod in sorted(pods, key=lambda pod: pod.metadata.creation_timestamp):
                ended = pod.status.container_statuses and pod.status.container_statuses[0].state.terminated
                if not ended:
                    continue
                row = {"stage": job.metadata.labels["huggingtweets.dev/stage"], "pod": pod.metadata.name,
                       "node": pod.spec.node_name, "imageID": pod.status.container_statuses[0].image_id,
                       "exitCode": ended.exit_code,
                       "createToRunning": (ended.started_at - pod.metadata.creation_timestamp).total_seconds(),
                       "running": (ended.finished_at - ended.started_at).total_seconds()}
                if ended.exit_code == 0 and job.status.completion_time:
                    row["exitToComplete"] = (job.status.completion_time - ended.finished_at).total_seconds()
                if row["stage"] == "train" and ended.exit_code == 0:
                    timings = timings_from_log(core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE))
                    if timings:
                        row["outsideLoopShare"] = timings["outsideLoopShare"]
                rows.append(row)
        return sorted(rows, key=lambda row: ["scrape", "train", "publish"].index(row["stage"]))

    def down(self) -> None:
        if self.hub is not None:
            self.hub.__exit__(None, None, None)
        if self.env is not None:
            self.env.down()


def print_pods(rows: list[dict], log=print) -> None:
    log("\n| stage | node | image | create -> running (s) | running (s) | exit -> Job complete (s) | outside the training loop |")
    log("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        share = f"{100 * row['outsideLoopShare']:.0f}%" if "outsideLoopShare" in row else ""
        log(f"| {row['stage']} | {row['node']} | {row['imageID'].rsplit('@', 1)[-1][:19]} | {row['createToRunning']:.0f} "
            f"| {row['running']:.0f} | {row.get('exitToComplete', float('nan')):.0f} | {share} |")


def print_report(status: dict, samples: list[str], log=print) -> None:
    artifacts = status.get("artifacts") or {}
    log(f"\nHub: {artifacts.get('hubUrl')} (commit {artifacts.get('hubCommit', '')[:12]})")
    log(f"S3:  {artifacts.get('modelUri')}")
    data = status.get("data") or []
    log("\n| Data | " + " | ".join(row["handle"] for row in data) + " |")
    for label, key in (("Tweets downloaded", "downloaded"), ("Retweets", "retweets"), ("Short tweets", "short"),
                       ("Tweets kept", "kept")):
        log(f"| {label} | " + " | ".join(str(row[key]) for row in data) + " |")
    metrics = status.get("metrics") or {}
    log(f"\neval loss {metrics.get('evalLoss')}, perplexity {metrics.get('perplexity')}, {metrics.get('steps')} steps")
    log("\nGenerated from \"My dream is\":")
    for sample in samples:
        log(f"  - {sample}")


def main(keep: bool = False) -> int:
    home = cache_root() / "demo"
    demo = Demo(home)
    started = time.monotonic()
    try:
        demo.up({"demo_dreamer": 400}, owner_pid=None if keep else os.getpid())
        demo.apply(demo_bot("demo-dreamer", ["demo_dreamer"], demo.env, demo.hub.url))
        print("applied TweetBot demo-dreamer; following it:")
        status = demo.wait("demo-dreamer")
        if status["phase"] != "Succeeded":
            print(f"the bot failed: {status.get('lastError')}")
            return 1
        repo_id = status["artifacts"]["hubUrl"].removeprefix(demo.hub.url + "/")
        print_report(status, demo.generate(repo_id))
        print_pods(demo.stage_pods("demo-dreamer"))
        print(f"\ndone in {time.monotonic() - started:.0f}s")
        if keep:
            print(f"\nthe cluster stays up: eval \"$(tweetbot-dev env --home {home})\" then kubectl get tweetbots;"
                  f" tweetbot-dev down --home {home} when done")
        return 0
    finally:
        if not keep:
            demo.down()
        else:  # the local Hub lives in this process; the cluster, its node and S3 stay
            demo.hub.__exit__(None, None, None)
