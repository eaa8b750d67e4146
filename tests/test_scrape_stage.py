"""`tweetbot-trainer scrape` as a Job runs it: the operator's request in, dataset in the real S3, result out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import boto3
import pytest

from tweetbot_dev.fakes import FakeAccount, FakePost, FakeSocialServer, tweets_js
from tweetbot_operator.stages import desired_job
from tweetbot_operator.settings import Settings
from tweetbot_trainer.contract import TERMINATION_MESSAGE_LIMIT, HandleStats, S3Layout, StageResult
from tweetbot_trainer import scrape as scrape_module
from tweetbot_trainer.errors import MalformedInput
from tweetbot_trainer.scrape import merge_posts, read_previous_posts, scrape_manifest
from tweetbot_trainer.sources import MAX_DISPLAY_NAME, Post

pytestmark = pytest.mark.s3

WORDS = "the quick brown fox jumps over the lazy dog while thinking about".split()


def fake_timeline(count: int, seed: int) -> list[FakePost]:
    posts = []
    for i in range(count):
        if i % 9 == 4:
            text, repost = "a retweeted thought about foxes", True
        elif i % 7 == 5:
            text, repost = "ok https://t.co/x", False
        else:
            text = " ".join(WORDS[(i * seed + k) % len(WORDS)] for k in range(12)) + f" & more #{i}"
            repost = False
        posts.append(FakePost(10_000 - i, text, repost))
    return posts


@pytest.fixture
def world(dev_env, tmp_path):
    s3 = boto3.client("s3", endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                      aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")
    bucket = f"scrape-{os.getpid()}-{tmp_path.name[-8:]}".lower().replace("_", "-")
    s3.create_bucket(Bucket=bucket)
    accounts = {"purefulsoul": FakeAccount("purefulsoul", "Pureful | Soul <3", fake_timeline(300, 3)),
                "turtlebreezee": FakeAccount("turtlebreezee", "Turtle", fake_timeline(120, 5)),
                "quiet": FakeAccount("quiet", "Quiet", fake_timeline(3, 1))}
    with FakeSocialServer(accounts) as server:
        yield dev_env, s3, bucket, server, tmp_path


def bot(bucket, endpoint, api_url, handles=("@PurefulSoul", "turtlebreezee"), **spec_changes):
    spec = {"handles": list(handles), "source": {"x": {"apiUrl": api_url, "bearerTokenSecretRef": {"name": "x", "key": "token"}},
                                                 "maxPostsPerHandle": 3200},
            "output": {"s3": {"bucket": bucket, "prefix": "tweetbot", "endpoint": endpoint}},
            "data": {"dropRetweets": True, "dropShortPosts": True, "keepReplies": True, "balanceHandles": False},
            "training": {"seed": 42}}
    spec.update(spec_changes)
    return {"metadata": {"name": "cyborg", "namespace": "bots", "uid": "u-1", "generation": 1}, "spec": spec}


def run_job_container(world, manifest_bot, token=None, run_id="run001", extends_run=""):
    """Run the scrape container's command with the environment its Job gives it (`extends_run` set in its request,
    as a scheduled run's)."""
    dev_env, s3, bucket, server, tmp_path = world
    container = desired_job(manifest_bot, run_id, "scrape", Settings())["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    if extends_run:
        env["TWEETBOT_REQUEST"] = json.dumps({**json.loads(env["TWEETBOT_REQUEST"]), "extends_run": extends_run})
    (tmp_path / "termination-log").unlink(missing_ok=True)
    env.update(PATH=os.environ["PATH"], HOME=os.environ["HOME"], PYTHONPATH=os.environ.get("PYTHONPATH", ""), X_BEARER_TOKEN=token or server.x_bearer_token,
               AWS_ACCESS_KEY_ID=dev_env.s3_access_key, AWS_SECRET_ACCESS_KEY=dev_env.s3_secret_key,
               TWEETBOT_TERMINATION_MESSAGE_PATH=str(tmp_path / "termination-log"))
    command = [sys.executable, "-m", "tweetbot_trainer.cli", *container["command"][1:]]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    message = (tmp_path / "termination-log").read_text() if (tmp_path / "termination-log").exists() else ""
    return finished, message


def test_scrape_writes_the_dataset_and_reports_its_stats(world):
    dev_env, s3, bucket, server, tmp_path = world
    finished, message = run_job_container(world, bot(bucket, dev_env.s3_endpoint, server.url))
    assert finished.returncode == 0, finished.stderr
    result = StageResult.from_termination_message(message)
    assert [s.handle for s in result.data] == ["purefulsoul", "turtlebreezee"]
    pureful = result.data[0]
    assert pureful.displayName == "Pureful | Soul <3"
    assert pureful.downloaded == 300 and pureful.downloaded == pureful.retweets + pureful.short + pureful.kept
    assert pureful.retweets == sum(1 for i in range(300) if i % 9 == 4)
    assert result.artifacts["datasetUri"] == f"s3://{bucket}/tweetbot/bots/cyborg/run001/data/dataset.jsonl"

    prefix = "tweetbot/bots/cyborg/run001/data/"
    lines = [json.loads(line) for line in
             s3.get_object(Bucket=bucket, Key=prefix + "dataset.jsonl")["Body"].read().decode().splitlines()]
    assert len(lines) == pureful.kept + result.data[1].kept
    assert lines[0]["handle"] == "purefulsoul" and lines[0]["id"] == "10000"
    assert "&amp;" not in lines[0]["text"] and "& more" in lines[0]["text"] and "https://" not in json.dumps(lines)
    stats = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "stats.json")["Body"].read())
    assert stats["network"] == "X" and stats["handles"][1]["handle"] == "turtlebreezee"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    for key, entry in manifest["files"].items():
        assert hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() == entry["sha256"]
    # Neither the token nor any post's text reaches the logs.
    logs = finished.stdout + finished.stderr
    assert server.x_bearer_token not in logs and "quick brown" not in logs and "lazy dog" not in logs


def test_balancing_oversamples_the_smaller_handle(world):
    dev_env, s3, bucket, server, tmp_path = world
    finished, _ = run_job_container(world, bot(bucket, dev_env.s3_endpoint, server.url,
                                               data={"balanceHandles": True}))
    assert finished.returncode == 0, finished.stderr
    body = s3.get_object(Bucket=bucket, Key="tweetbot/bots/cyborg/run001/data/dataset.jsonl")["Body"].read().decode()
    characters = {}
    for line in body.splitlines():
        post = json.loads(line)
        characters[post["handle"]] = characters.get(post["handle"], 0) + len(post["text"])
    assert characters["turtlebreezee"] >= characters["purefulsoul"] * 0.95


@pytest.mark.parametrize("handles, token, exit_code, message", [
    (["purefulsoul", "ghost"], None, 10, "UnknownHandle: @ghost does not exist on X"),
    (["purefulsoul", "quiet"], None, 17, "NotEnoughText: quiet has only"),
    (["purefulsoul"], "wrong-token", 12, "AuthenticationFailed: the X API refused the bearer token (401)"),
])
def test_failures_exit_with_their_own_code_and_reason(world, handles, token, exit_code, message):
    dev_env, s3, bucket, server, tmp_path = world
    finished, termination = run_job_container(world, bot(bucket, dev_env.s3_endpoint, server.url, handles=handles), token)
    assert finished.returncode == exit_code, finished.stderr
    result = StageResult.from_termination_message(termination)
    assert not result.ok and result.error.startswith(message)
    assert "wrong-token" not in termination + finished.stderr
    assert "KeyCount" not in s3.list_objects_v2(Bucket=bucket, Prefix="tweetbot/") or \
        s3.list_objects_v2(Bucket=bucket, Prefix="tweetbot/")["KeyCount"] == 0


def test_an_unknown_contract_version_is_refused(world, tmp_path):
    env = {**os.environ, "TWEETBOT_REQUEST": json.dumps({"version": 99, "stage": "scrape"}),
           "TWEETBOT_TERMINATION_MESSAGE_PATH": str(tmp_path / "log")}
    finished = subprocess.run([sys.executable, "-m", "tweetbot_trainer.cli", "scrape"], env=env, capture_output=True, text=True)
    assert finished.returncode == 2
    assert "contract version 99, this side speaks version 1" in StageResult.from_termination_message((tmp_path / "log").read_text()).error


def test_by_hand_from_an_archive_in_s3(world):
    dev_env, s3, bucket, server, tmp_path = world
    for handle in ("purefulsoul", "turtlebreezee"):
        s3.put_object(Bucket=bucket, Key=f"archives/{handle}/tweets.js",
                      Body=tweets_js(server.accounts[handle].posts).encode())
    env = {**os.environ, "AWS_ENDPOINT_URL": dev_env.s3_endpoint, "AWS_ACCESS_KEY_ID": dev_env.s3_access_key,
           "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key}
    env.pop("TWEETBOT_REQUEST", None)
    finished = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "tweetbot-trainer"), "scrape", "--source", "x-archive", "--archive", f"s3://{bucket}/archives/{{handle}}/tweets.js",
         "--handles", "TurtleBreezee,@purefulsoul", "--out", f"s3://{bucket}/manual/"],
        env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    printed = json.loads(finished.stdout)
    assert [row["handle"] for row in printed["data"]] == ["purefulsoul", "turtlebreezee"]
    assert HandleStats(**printed["data"][0]).downloaded == 300
    assert s3.head_object(Bucket=bucket, Key="manual/data/manifest.json")["ContentLength"] > 0


def test_display_names_of_any_length_still_give_a_result(world):
    dev_env, s3, bucket, server, tmp_path = world
    server.accounts["purefulsoul"].display_name = "[x](https://evil.example)\n" + "🍂" * 10_000
    server.accounts["turtlebreezee"].display_name = "T" * 10_000
    finished, message = run_job_container(world, bot(bucket, dev_env.s3_endpoint, server.url))
    assert finished.returncode == 0, finished.stderr
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    result = StageResult.from_termination_message(message)
    assert [len(s.displayName) for s in result.data] == [MAX_DISPLAY_NAME, MAX_DISPLAY_NAME]
    assert result.data[0].displayName.startswith("[x](https://evil.example) 🍂")  # one line; the card escapes it
    stats = json.loads(s3.get_object(Bucket=bucket, Key="tweetbot/bots/cyborg/run001/data/stats.json")["Body"].read())
    assert [h["displayName"] for h in stats["handles"]] == [s.displayName for s in result.data]


# --- scheduled runs: a scrape that extends an earlier run's posts ------------------------------------------

def test_merge_posts_puts_the_new_first_drops_the_known_and_keeps_the_newest():
    previous = [Post(str(i), f"old {i}", False) for i in (5, 4, 3, 2, 1)]
    fetched = [Post("7", "new 7", False), Post("6", "new 6", True), Post("5", "old 5 again", False)]
    merged, new_ids = merge_posts(fetched, previous, limit=6)
    assert [p.id for p in merged] == ["7", "6", "5", "4", "3", "2"] and merged[2].text == "old 5"
    assert new_ids == {"7", "6"}
    assert merge_posts([], previous, limit=10) == (previous, set())
    assert merge_posts(fetched, [], limit=2) == (fetched[:2], {"7", "6"})


class PostsFileStorage:
    """A Storage's read and stream over one earlier run's manifest and posts.jsonl, in memory."""

    def __init__(self, layout, body: bytes):
        self.files = {f"s3://{layout.bucket}/{scrape_manifest(layout)}": json.dumps({"files": {layout.posts: {}}}).encode(),
                      f"s3://{layout.bucket}/{layout.posts}": body}

    def read(self, uri):
        return b"".join(self.stream(uri))

    def stream(self, uri):
        if uri not in self.files:
            raise FileNotFoundError(uri)
        return iter([self.files[uri][i:i + 1000] for i in range(0, len(self.files[uri]), 1000)])


def test_the_earlier_posts_are_read_within_a_cap_per_post_and_handle(monkeypatch):
    layout = S3Layout(bucket="b", prefix="tweetbot", namespace="bots", bot="cyborg", run_id="run001")
    rows = [{"handle": handle, "id": str(i), "text": "x" * 100, "is_repost": i == 1, "created_at": ""}
            for handle in ("alice", "bob", "carol") for i in range(3, 0, -1)]
    storage = PostsFileStorage(layout, "".join(json.dumps(row) + "\n" for row in rows).encode())
    posts = read_previous_posts(storage, layout, ["alice", "bob"], limit=2)
    assert {handle: [(p.id, p.is_repost) for p in kept] for handle, kept in posts.items()} == {
        "alice": [("3", False), ("2", False)], "bob": [("3", False), ("2", False)]}
    assert read_previous_posts(storage, layout.of_run("run000"), ["alice"], limit=2) is None
    monkeypatch.setattr(scrape_module, "POSTS_FILE_BYTES_PER_POST", 100)
    with pytest.raises(MalformedInput, match=r"posts.jsonl is larger than 400 bytes.*scrape.POSTS_FILE_BYTES_PER_POST"):
        read_previous_posts(storage, layout, ["alice", "bob"], limit=2)


def scrape(world, manifest_bot, run_id, extends_run=""):
    finished, message = run_job_container(world, manifest_bot, run_id=run_id, extends_run=extends_run)
    assert finished.returncode == 0, finished.stderr
    return StageResult.from_termination_message(message), finished.stderr


def read_jsonl(s3, bucket, run_id, name):
    body = s3.get_object(Bucket=bucket, Key=f"tweetbot/bots/cyborg/{run_id}/data/{name}")["Body"].read()
    return [json.loads(line) for line in body.decode().splitlines()]


def add_posts(server, handle, count, first_id=20_000):
    """`count` new posts on top of the handle's timeline, every fifth a retweet."""
    new = [FakePost(first_id + count - i, f"fresh news number {i} about the lazy dog", i % 5 == 2) for i in range(count)]
    server.accounts[handle].posts[:0] = new
    return new


def timeline_requests(server, since=None):
    return [path for path in server.requests if path.split("?")[0].endswith("/tweets")
            and (since is None or f"since_id={since}" in path)]


def test_a_scheduled_scrape_adds_the_new_posts_to_the_earlier_runs(world):
    dev_env, s3, bucket, server, tmp_path = world
    manifest_bot = bot(bucket, dev_env.s3_endpoint, server.url)
    first, _ = scrape(world, manifest_bot, "run001")
    posts = read_jsonl(s3, bucket, "run001", "posts.jsonl")
    assert [p["id"] for p in posts if p["handle"] == "purefulsoul"] == [str(10_000 - i) for i in range(300)]
    assert len(posts) == 420 and set(posts[4]) == {"handle", "id", "text", "is_repost", "created_at"}
    assert posts[4]["is_repost"] and "&" in posts[0]["text"]  # raw: as the source gave them, before cleaning
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="tweetbot/bots/cyborg/run001/data/manifest.json")["Body"].read())
    assert "tweetbot/bots/cyborg/run001/data/posts.jsonl" in manifest["files"]
    assert first.metrics["newPosts"] == first.metrics["posts"]

    add_posts(server, "purefulsoul", 10)
    add_posts(server, "turtlebreezee", 4)
    server.requests.clear()
    second, _ = scrape(world, manifest_bot, "run002", extends_run="run001")
    # Asked only for what is newer than the newest post it had: one page per handle.
    assert len(timeline_requests(server, since="10000")) == 2 and len(timeline_requests(server)) == 2
    fresh, _ = scrape(world, manifest_bot, "run003")
    # The merged dataset is the one a full scrape makes now, counts and all.
    assert second.data == fresh.data and second.data[0].downloaded == 310 and second.data[1].downloaded == 124
    assert read_jsonl(s3, bucket, "run002", "dataset.jsonl") == read_jsonl(s3, bucket, "run003", "dataset.jsonl")
    assert read_jsonl(s3, bucket, "run002", "posts.jsonl") == read_jsonl(s3, bucket, "run003", "posts.jsonl")
    assert second.metrics["newPosts"] == 8 + 3  # the new posts kept: not the retweets
    assert second.metrics["posts"] == first.metrics["posts"] + 11


def test_a_scheduled_scrape_without_new_posts_gives_the_same_dataset(world):
    dev_env, s3, bucket, server, tmp_path = world
    manifest_bot = bot(bucket, dev_env.s3_endpoint, server.url)
    first, _ = scrape(world, manifest_bot, "run001")
    second, _ = scrape(world, manifest_bot, "run002", extends_run="run001")
    assert second.metrics["newPosts"] == 0 and second.data == first.data
    assert read_jsonl(s3, bucket, "run002", "dataset.jsonl") == read_jsonl(s3, bucket, "run001", "dataset.jsonl")
    stats = [json.loads(s3.get_object(Bucket=bucket, Key=f"tweetbot/bots/cyborg/{run}/data/stats.json")["Body"].read())
             for run in ("run001", "run002")]
    assert stats[0]["handles"] == stats[1]["handles"] and stats[1]["collectedAt"] >= stats[0]["collectedAt"]


def test_a_scheduled_scrape_keeps_the_newest_max_posts_per_handle(world):
    dev_env, s3, bucket, server, tmp_path = world
    manifest_bot = bot(bucket, dev_env.s3_endpoint, server.url)
    manifest_bot["spec"]["source"]["maxPostsPerHandle"] = 150
    scrape(world, manifest_bot, "run001")
    new = add_posts(server, "purefulsoul", 10)
    second, _ = scrape(world, manifest_bot, "run002", extends_run="run001")
    ids = [p["id"] for p in read_jsonl(s3, bucket, "run002", "posts.jsonl") if p["handle"] == "purefulsoul"]
    assert ids == [str(p.id) for p in new] + [str(10_000 - i) for i in range(140)]
    assert second.data[0].downloaded == 150 and second.metrics["newPosts"] == 8
    fresh, _ = scrape(world, manifest_bot, "run003")
    assert second.data == fresh.data
    assert read_jsonl(s3, bucket, "run002", "dataset.jsonl") == read_jsonl(s3, bucket, "run003", "dataset.jsonl")


def test_a_scheduled_scrape_of_a_run_without_posts_scrapes_everything(world):
    dev_env, s3, bucket, server, tmp_path = world
    manifest_bot = bot(bucket, dev_env.s3_endpoint, server.url)
    first, _ = scrape(world, manifest_bot, "run001")
    # A run from before posts.jsonl: its manifest names the dataset and stats alone.
    prefix = "tweetbot/bots/cyborg/run001/data/"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    del manifest["files"][prefix + "posts.jsonl"]
    s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    s3.delete_object(Bucket=bucket, Key=prefix + "posts.jsonl")
    server.requests.clear()
    for run_id, earlier in (("run002", "run001"), ("run003", "no-such-run")):
        result, logs = scrape(world, manifest_bot, run_id, extends_run=earlier)
        assert result.data == first.data and result.metrics["newPosts"] == result.metrics["posts"] == first.metrics["posts"]
        assert f"{earlier} has no posts.jsonl" in logs
        assert read_jsonl(s3, bucket, run_id, "dataset.jsonl") == read_jsonl(s3, bucket, "run001", "dataset.jsonl")
    assert not timeline_requests(server, since="10000")


def test_new_posts_counts_each_kept_post_once_when_balancing_repeats_it(world):
    dev_env, s3, bucket, server, tmp_path = world
    manifest_bot = bot(bucket, dev_env.s3_endpoint, server.url, data={"balanceHandles": True})
    first, _ = scrape(world, manifest_bot, "run001")
    assert first.metrics["newPosts"] == sum(s.kept for s in first.data) < first.metrics["posts"]
    add_posts(server, "turtlebreezee", 4)
    second, _ = scrape(world, manifest_bot, "run002", extends_run="run001")
    assert second.metrics["newPosts"] == 3
