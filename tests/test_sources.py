"""The real source clients against local servers speaking each network's wire format, and the real S3."""

from __future__ import annotations

import boto3
import pytest

from tweetbot_dev.fakes import FakeAccount, FakePost, FakeSocialServer, tweets_js
from tweetbot_trainer.errors import (
    AuthenticationFailed,
    MalformedInput,
    NetworkFailure,
    PrivateAccount,
    RateLimited,
    UnknownHandle,
)
from tweetbot_trainer.sources import open_source
from tweetbot_trainer.sources.bluesky import BlueskySource
from tweetbot_trainer.sources.mastodon import MastodonSource
from tweetbot_trainer.sources.x_api import XApiSource
from tweetbot_trainer.sources.x_archive import XArchiveSource, parse_tweets_js
from tweetbot_trainer.storage import Storage

FAST = {"backoff": 0.01}


def timeline(n: int, first_id: int = 100_000, every_repost: int = 10) -> list[FakePost]:
    return [FakePost(first_id - i, f"post number {i} says a & b <3", is_repost=(i % every_repost == 3)) for i in range(n)]


@pytest.fixture
def server():
    accounts = {
        "alice": FakeAccount("alice", "Alice A.", timeline(250)),
        "prolific": FakeAccount("prolific", "Prolific", timeline(4000)),
        "secretive": FakeAccount("secretive", "Hidden", timeline(20), protected=True),
        "longform": FakeAccount("longform", "Long", [FakePost(5, "word " * 100)]),
    }
    with FakeSocialServer(accounts) as fake:
        yield fake


# --- X API v2 ------------------------------------------------------------------------------------------

def test_x_api_pages_through_a_timeline(server):
    got = XApiSource(server.url, server.x_bearer_token, **FAST).fetch("alice", 3200)
    assert got.display_name == "Alice A." and len(got.posts) == 250
    assert [p.id for p in got.posts[:2]] == ["100000", "99999"]
    assert got.posts[0].text == "post number 0 says a &amp; b &lt;3"  # X escapes; cleaning unescapes
    assert sum(p.is_repost for p in got.posts) == 25
    assert sum("/tweets" in path for path in server.requests) == 3  # 100 + 100 + 50


def test_x_api_serves_at_most_the_newest_3200(server):
    got = XApiSource(server.url, server.x_bearer_token, **FAST).fetch("prolific", 5000)
    assert len(got.posts) == 3200 and got.posts[-1].id == str(100_000 - 3199)
    assert len(XApiSource(server.url, server.x_bearer_token, **FAST).fetch("prolific", 150).posts) == 150


def test_x_api_since_id_fetches_only_newer_posts(server):
    got = XApiSource(server.url, server.x_bearer_token, since_id="99990", **FAST).fetch("alice", 3200)
    assert [p.id for p in got.posts] == [str(100_000 - i) for i in range(10)]


def test_x_api_long_posts_come_from_note_tweet(server):
    assert XApiSource(server.url, server.x_bearer_token, **FAST).fetch("longform", 10).posts[0].text == "word " * 100


def test_x_api_waits_out_a_rate_limit_within_its_budget(server):
    server.rate_limited_requests = 1
    slept = []
    source = XApiSource(server.url, server.x_bearer_token, sleep=slept.append, **FAST)
    assert len(source.fetch("alice", 3200).posts) == 250
    assert len(slept) == 1 and 0 < slept[0] <= 3


def test_x_api_gives_up_on_a_rate_limit_beyond_its_budget(server):
    server.rate_limited_requests, server.rate_limit_reset_seconds = 1, 3600
    with pytest.raises(RateLimited, match="beyond the remaining 900s"):
        XApiSource(server.url, server.x_bearer_token, sleep=lambda s: None, **FAST).fetch("alice", 3200)


def test_x_api_retries_server_errors(server):
    server.failing_requests = 2
    assert len(XApiSource(server.url, server.x_bearer_token, **FAST).fetch("alice", 100).posts) == 100
    server.failing_requests = 10
    with pytest.raises(NetworkFailure, match="answered 503 4 times"):
        XApiSource(server.url, server.x_bearer_token, **FAST).fetch("alice", 100)


def test_x_api_errors_say_what_is_wrong(server):
    with pytest.raises(UnknownHandle, match="@nobody does not exist on X"):
        XApiSource(server.url, server.x_bearer_token, **FAST).fetch("nobody", 10)
    with pytest.raises(PrivateAccount, match="protected"):
        XApiSource(server.url, server.x_bearer_token, **FAST).fetch("secretive", 10)
    with pytest.raises(AuthenticationFailed, match="refused the bearer token") as refused:
        XApiSource(server.url, "wrong-token-value", **FAST).fetch("alice", 10)
    assert "wrong-token-value" not in str(refused.value)
    with pytest.raises(AuthenticationFailed, match="X_BEARER_TOKEN is empty"):
        open_source({"x": {"apiUrl": server.url}}, read=None, environ={})
    with pytest.raises(NetworkFailure, match="cannot reach 127.0.0.1:9"):
        XApiSource("http://127.0.0.1:9", "t", **FAST).fetch("alice", 10)


# --- Mastodon and Bluesky -------------------------------------------------------------------------------

def test_mastodon_follows_link_headers_and_turns_html_into_text(server):
    got = MastodonSource(server.url, **FAST).fetch("alice", 3200)
    assert got.display_name == "Alice A." and len(got.posts) == 250
    assert got.posts[0].text == "post number 0 says a &amp; b &lt;3"
    assert sum(p.is_repost for p in got.posts) == 25
    assert sum("/statuses" in path for path in server.requests) == 7  # pages of 40
    with pytest.raises(UnknownHandle, match="nobody does not exist on"):
        MastodonSource(server.url, **FAST).fetch("nobody", 10)


def test_mastodon_rate_limit_reset_is_an_iso_time(server):
    server.rate_limited_requests = 1
    slept = []
    assert len(MastodonSource(server.url, sleep=slept.append, **FAST).fetch("alice", 40).posts) == 40
    assert len(slept) == 1 and 0 < slept[0] <= 3


def test_bluesky_follows_cursors_and_counts_reposts(server):
    got = BlueskySource(server.url, **FAST).fetch("alice", 3200)
    assert got.display_name == "Alice A." and len(got.posts) == 250
    assert got.posts[0].text == "post number 0 says a & b <3"  # Bluesky sends plain text
    assert sum(p.is_repost for p in got.posts) == 25
    with pytest.raises(UnknownHandle, match="Profile not found"):
        BlueskySource(server.url, **FAST).fetch("nobody", 10)


# --- archives and files, over HTTP and from the real S3 server -----------------------------------------

def test_archive_parsing_and_malformed_files():
    posts = parse_tweets_js(tweets_js(timeline(30)))
    assert len(posts) == 30 and sum(p.is_repost for p in posts) == 3
    assert posts[3].text.startswith("RT @someone: ")
    with pytest.raises(MalformedInput, match="does not start with 'window.YTD.tweets.partN ='"):
        parse_tweets_js('{"not": "an archive"}')
    with pytest.raises(MalformedInput, match="not valid archive JSON"):
        parse_tweets_js("window.YTD.tweets.part0 = [{")
    with pytest.raises(MalformedInput, match="without full_text"):
        parse_tweets_js('window.YTD.tweets.part0 = [{"tweet": {"id_str": "1"}}]')


def test_archive_over_http(server):
    got = XArchiveSource(f"{server.url}/archives/{{handle}}/tweets.js", Storage().read).fetch("alice", 5000)
    assert len(got.posts) == 250 and got.posts[0].id == "100000"


@pytest.fixture
def s3(dev_env):
    client = boto3.client("s3", endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                          aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")
    return client


@pytest.fixture
def storage(dev_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", dev_env.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", dev_env.s3_secret_key)
    return Storage(dev_env.s3_endpoint)


@pytest.mark.s3
def test_a_split_archive_in_s3_is_read_whole(s3, storage):
    s3.create_bucket(Bucket="archives")
    posts = timeline(300)
    s3.put_object(Bucket="archives", Key="alice/data/tweets.js", Body=tweets_js(posts[:100]).encode())
    s3.put_object(Bucket="archives", Key="alice/data/tweets-part1.js", Body=tweets_js(posts[100:250], 1).encode())
    s3.put_object(Bucket="archives", Key="alice/data/tweets-part2.js", Body=tweets_js(posts[250:], 2).encode())
    got = XArchiveSource("s3://archives/{handle}/data/tweets.js", storage.read).fetch("alice", 10_000)
    assert len(got.posts) == 300 and got.posts[0].id == "100000" and got.posts[-1].id == str(100_000 - 299)
    with pytest.raises(FileNotFoundError):
        XArchiveSource("s3://archives/{handle}/data/tweets.js", storage.read).fetch("bob", 10)


@pytest.mark.s3
def test_posts_files_in_s3(s3, storage):
    s3.create_bucket(Bucket="files")
    s3.put_object(Bucket="files", Key="posts.jsonl", Body=(
        b'{"handle": "alice", "id": "1", "text": "first post from alice"}\n'
        b'{"handle": "@Bob", "id": "2", "text": "bob says hi", "is_repost": true}\n'
        b'{"handle": "alice", "id": "3", "text": "second post"}\n'))
    s3.put_object(Bucket="files", Key="posts.csv", Body=b"id,text,is_repost\n1,\"a, quoted post\",false\n2,RT @x: shared,true\n")
    s3.put_object(Bucket="files", Key="broken.jsonl", Body=b'{"text": "ok"}\nnot json\n')
    source = open_source({"file": {"uri": "s3://files/posts.jsonl"}}, storage.read, {})
    assert [p.id for p in source.fetch("alice", 10).posts] == ["1", "3"]
    assert source.fetch("bob", 10).posts[0].is_repost
    csv_posts = open_source({"file": {"uri": "s3://files/posts.csv"}}, storage.read, {}).fetch("anyone", 10).posts
    assert [(p.text, p.is_repost) for p in csv_posts] == [("a, quoted post", False), ("RT @x: shared", True)]
    with pytest.raises(MalformedInput, match="broken.jsonl line 2 is not JSON"):
        open_source({"file": {"uri": "s3://files/broken.jsonl"}}, storage.read, {}).fetch("a", 10)
