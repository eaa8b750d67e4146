"""The real source clients against local servers speaking each network's wire format, and the real S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest

from tweetbot_dev.fakes import FakeAccount, FakePost, FakeSocialServer, tweets_js
from tweetbot_trainer.contract import SOURCES, S3Layout, StageRequest, StageResult
from tweetbot_trainer.errors import (
    AuthenticationFailed,
    MalformedInput,
    MissingInput,
    NetworkFailure,
    PrivateAccount,
    RateLimited,
    StageError,
    UnknownHandle,
    redact_url,
    redact_urls,
)
from tweetbot_trainer import sources
from tweetbot_trainer.sources import MAX_EMPTY_PAGES, Pages, open_source
from tweetbot_trainer.sources import files
from tweetbot_trainer.sources.bluesky import BlueskySource
from tweetbot_trainer.sources.files import FileSource, read_posts_file
from tweetbot_trainer.sources.http import MAX_RATE_LIMITED, MIN_RATE_LIMIT_WAIT
from tweetbot_trainer.sources.mastodon import MastodonSource
from tweetbot_trainer.sources.x_api import XApiSource
from tweetbot_trainer.sources.x_archive import MAX_ARCHIVE_PARTS, XArchiveSource, parse_tweets_js, read_tweets_js
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
    got = XApiSource(server.url, server.x_bearer_token, **FAST).fetch("alice", 3200, since="99990")
    assert [p.id for p in got.posts] == [str(100_000 - i) for i in range(10)]
    timeline_requests = [path for path in server.requests if "/tweets" in path]
    assert len(timeline_requests) == 1 and "since_id=99990" in timeline_requests[0]


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
        open_source({"x": {"apiUrl": server.url}}, storage=None, environ={})
    with pytest.raises(NetworkFailure, match="cannot reach 127.0.0.1:9"):
        XApiSource("http://127.0.0.1:9", "t", **FAST).fetch("alice", 10)


def test_every_source_of_the_contract_has_a_client_and_no_other():
    assert sources.CLIENTS.keys() == SOURCES.keys()


def test_open_source_fills_the_spec_defaults_and_names_the_sources_it_knows():
    assert open_source({"bluesky": {}}, storage=None, environ={}).app_view_url == "https://public.api.bsky.app"
    assert open_source({"x": {}}, storage=None, environ={"X_BEARER_TOKEN": "t"}).api_url == "https://api.x.com"
    with pytest.raises(MalformedInput, match=r"no known source in \['rss'\]: expected x, xArchive, mastodon, bluesky or file"):
        open_source({"rss": {}}, storage=None, environ={})


# --- Mastodon and Bluesky -------------------------------------------------------------------------------

def test_mastodon_follows_link_headers_and_turns_html_into_text(server):
    got = MastodonSource(server.url, **FAST).fetch("alice", 3200)
    assert got.display_name == "Alice A." and len(got.posts) == 250
    assert got.posts[0].text == "post number 0 says a &amp; b &lt;3"
    assert sum(p.is_repost for p in got.posts) == 25
    assert sum("/statuses" in path for path in server.requests) == 7  # pages of 40
    with pytest.raises(UnknownHandle, match="nobody does not exist on"):
        MastodonSource(server.url, **FAST).fetch("nobody", 10)


def test_mastodon_since_id_fetches_only_newer_posts_on_every_page(server):
    got = MastodonSource(server.url, **FAST).fetch("alice", 3200, since="99950")
    assert [p.id for p in got.posts] == [str(100_000 - i) for i in range(50)]
    pages = [path for path in server.requests if "/statuses" in path]
    assert len(pages) == 2 and all("since_id=99950" in path for path in pages)


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


def test_bluesky_since_stops_paging_at_the_known_post(server):
    known = "at://did:plc:fake/app.bsky.feed.post/99850"
    got = BlueskySource(server.url, **FAST).fetch("alice", 3200, since=known)
    assert [p.id for p in got.posts] == [f"at://did:plc:fake/app.bsky.feed.post/{100_000 - i}" for i in range(150)]
    assert got.display_name == "Alice A."
    assert sum("getAuthorFeed" in path for path in server.requests) == 2  # not the third page of 50


def test_bluesky_since_is_not_matched_by_a_repost(server):
    """A repost's URI is the reposted post's, which can come again (a person reposting their own post):
    only an original post ends the new ones."""
    server.accounts["alice"].posts[5].is_repost = True  # 99995, now a repost of that URI
    got = BlueskySource(server.url, **FAST).fetch("alice", 3200, since="at://did:plc:fake/app.bsky.feed.post/99995")
    assert len(got.posts) == 250


def test_a_since_no_source_knows_changes_nothing(server):
    assert len(BlueskySource(server.url, **FAST).fetch("alice", 3200, since="at://gone").posts) == 250
    assert len(MastodonSource(server.url, **FAST).fetch("alice", 3200, since="1").posts) == 250


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
    got = XArchiveSource(f"{server.url}/archives/{{handle}}/tweets.js", Storage().stream).fetch("alice", 5000)
    assert len(got.posts) == 250 and got.posts[0].id == "100000"
    # Files are read whole whatever the since: the scrape's merge drops the posts it had.
    source = XArchiveSource(f"{server.url}/archives/{{handle}}/tweets.js", Storage().stream)
    assert source.fetch("alice", 5000, since="99990").posts == got.posts


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
    got = XArchiveSource("s3://archives/{handle}/data/tweets.js", storage.stream).fetch("alice", 10_000)
    assert len(got.posts) == 300 and got.posts[0].id == "100000" and got.posts[-1].id == str(100_000 - 299)
    with pytest.raises(MissingInput, match="no X archive at s3://archives/bob/data/tweets.js"):
        XArchiveSource("s3://archives/{handle}/data/tweets.js", storage.stream).fetch("bob", 10)


@pytest.mark.s3
def test_posts_files_in_s3(s3, storage):
    s3.create_bucket(Bucket="files")
    s3.put_object(Bucket="files", Key="posts.jsonl", Body=(
        b'{"handle": "alice", "id": "1", "text": "first post from alice"}\n'
        b'{"handle": "@Bob", "id": "2", "text": "bob says hi", "is_repost": true}\n'
        b'{"handle": "alice", "id": "3", "text": "second post"}\n'))
    s3.put_object(Bucket="files", Key="posts.csv", Body=b"id,text,is_repost\n1,\"a, quoted post\",false\n2,RT @x: shared,true\n")
    s3.put_object(Bucket="files", Key="broken.jsonl", Body=b'{"text": "ok"}\nnot json\n')
    source = open_source({"file": {"uri": "s3://files/posts.jsonl"}}, storage, {})
    assert [p.id for p in source.fetch("alice", 10).posts] == ["1", "3"]
    assert [p.id for p in source.fetch("alice", 10, since="3").posts] == ["1", "3"]
    assert source.fetch("bob", 10).posts[0].is_repost
    csv_posts = open_source({"file": {"uri": "s3://files/posts.csv"}}, storage, {}).fetch("anyone", 10).posts
    assert [(p.text, p.is_repost) for p in csv_posts] == [("a, quoted post", False), ("RT @x: shared", True)]
    with pytest.raises(MalformedInput, match="broken.jsonl line 2 is not JSON"):
        open_source({"file": {"uri": "s3://files/broken.jsonl"}}, storage, {}).fetch("a", 10)


# --- bounds on what a source reads, and on how long it tries ----------------------------------------------

class Scripted:
    """A local HTTP server answering as a test says: answer(path, query) -> (status, headers, body)."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                parts = urlsplit(self.path)
                scripted.requests.append(self.path)
                status, headers, body = scripted.answer(parts.path, dict(parse_qsl(parts.query)))
                data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


S3_ACCESS_DENIED = (403, {"Content-Type": "application/xml"},
                    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")


def test_archive_entries_are_parsed_across_any_chunk_boundaries():
    text = "\ufeff" + tweets_js([FakePost(i, f"ünïcode {i} \"quoted\" ] }} 🤖") for i in range(1, 40)], part=3) + ";\n"
    whole = parse_tweets_js(text)
    assert len(whole) == 39 and whole[0].text == 'ünïcode 1 "quoted" ] } 🤖'
    data = text.encode()
    for size in (1, 7, 4096):
        assert list(read_tweets_js(data[i:i + size] for i in range(0, len(data), size))) == whole
    with pytest.raises(MalformedInput, match="not valid archive JSON"):
        parse_tweets_js(text.replace("];", "] trailing"))
    with pytest.raises(MalformedInput, match="holds no list of posts"):
        parse_tweets_js('window.YTD.tweets.part0 = {"tweet": {}}')
    with pytest.raises(MalformedInput, match="not UTF-8"):
        list(read_tweets_js([b"window.YTD.tweets.part0 = [\xff]"]))


def traced_peak(call):
    """`call()`'s result and the most memory Python allocated at once while it ran."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_archive_is_read_in_little_memory(tmp_path):
    path = tmp_path / "tweets.js"
    path.write_text(tweets_js(timeline(60_000)))
    size, storage = path.stat().st_size, Storage()
    got, peak = traced_peak(lambda: XArchiveSource(str(path), lambda uri: storage.stream(uri, chunk_size=64 * 1024)).fetch("alice", 100))
    assert [p.id for p in got.posts[:2]] == ["100000", "99999"] and len(got.posts) == 100
    # A few chunks and the newest 100 posts, not the archive (reading it whole took 5x its size).
    assert peak < size / 10, f"peak {peak:,} bytes for a {size:,}-byte archive"


def test_an_archive_beyond_the_byte_cap_fails_naming_the_cap():
    body = tweets_js(timeline(20_000))  # about 3 MB
    with Scripted(lambda path, query: (200, {}, body)) as server:
        with pytest.raises(MalformedInput, match=r"larger than 1,048,576 bytes.*MAX_ARCHIVE_BYTES"):
            XArchiveSource(f"{server.url}/alice/tweets.js", Storage().stream, max_bytes=2**20).fetch("alice", 10)


def test_archive_parts_end_at_a_403_or_404_after_the_first():
    files = {"/a/tweets.js": tweets_js(timeline(100)), "/a/tweets-part1.js": tweets_js(timeline(50, first_id=50), 1)}
    for missing in ((404, {}, "no such file"), S3_ACCESS_DENIED):
        with Scripted(lambda path, query: (200, {}, files[path]) if path in files else missing) as server:
            got = XArchiveSource(f"{server.url}/{{handle}}/tweets.js", Storage().stream).fetch("a", 1000)
            assert len(got.posts) == 150
            with pytest.raises(MissingInput, match=r"no X archive at http://127\.0\.0\.1:\d+/b/tweets\.js"):
                XArchiveSource(f"{server.url}/{{handle}}/tweets.js", Storage().stream).fetch("b", 1000)


def test_archive_parts_end_at_access_denied_from_s3(monkeypatch):
    """AWS S3 answers AccessDenied for a missing key when the reader may not list the bucket (MinIO answers
    NoSuchKey even then), so a local server speaks S3's error here."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reader-secret")
    files = {"/archives/a/tweets.js": tweets_js(timeline(100)),
             "/archives/a/tweets-part1.js": tweets_js(timeline(50, first_id=50), 1)}
    with Scripted(lambda path, query: (200, {}, files[path]) if path in files else S3_ACCESS_DENIED) as s3:
        storage = Storage(s3.url)
        assert len(XArchiveSource("s3://archives/{handle}/tweets.js", storage.stream).fetch("a", 1000).posts) == 150
        assert s3.requests[-1] == "/archives/a/tweets-part2.js"
        with pytest.raises(MissingInput, match="no X archive at s3://archives/b/tweets.js"):
            XArchiveSource("s3://archives/{handle}/tweets.js", storage.stream).fetch("b", 1000)


def test_endless_archive_parts_are_cut_off():
    def answer(path, query):
        part = path.rsplit("part", 1)[-1].split(".")[0] if "part" in path else "0"
        return 200, {}, tweets_js(timeline(1, first_id=int(part) + 1), int(part))

    with Scripted(answer) as server:
        with pytest.raises(MalformedInput, match=f"more than {MAX_ARCHIVE_PARTS} parts"):
            XArchiveSource(f"{server.url}/a/tweets.js", Storage().stream).fetch("a", 10)
        assert len(server.requests) == MAX_ARCHIVE_PARTS + 1


def posts_jsonl(rows: int, handles=("alice", "bob")) -> str:
    return "".join(json.dumps({"handle": handles[i % len(handles)], "id": str(i), "text": f"post {i} says a & b <3",
                               "is_repost": i % 10 == 3}) + "\n" for i in range(rows))


def test_posts_files_are_parsed_across_any_chunk_boundaries():
    jsonl = ("\ufeff" + json.dumps({"id": "1", "text": "ünïcode 🤖 \"quoted\""}, ensure_ascii=False) + "\r\n\n"
             + json.dumps({"id": "2", "text": "raw separators \u2028 \u2029 \x0b \x0c \x1c inside"}, ensure_ascii=False))
    csv_text = '\ufeffid,text\n1,"a post\nover two lines, with ""quotes"" 🤖"\n2,plain\n'
    for text, name in ((jsonl, "posts.jsonl"), (csv_text, "posts.csv")):
        whole = list(read_posts_file([text.encode()], name))
        assert [row["id"] for row in whole] == ["1", "2"], name
        data = text.encode()
        for size in (1, 7, 4096):
            assert list(read_posts_file((data[i:i + size] for i in range(0, len(data), size)), name)) == whole, (name, size)
    assert list(read_posts_file([jsonl.encode()], "posts.jsonl"))[1]["text"] == "raw separators \u2028 \u2029 \x0b \x0c \x1c inside"
    assert list(read_posts_file([csv_text.encode()], "posts.csv"))[0]["text"] == 'a post\nover two lines, with "quotes" 🤖'


@pytest.mark.parametrize("body, name, error", [
    ('{"text": "a"}\n{"text": "b", "id": ' + "9" * 5000 + "}\n", "posts.jsonl", "posts.jsonl line 2 is not JSON"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "posts.jsonl", "posts.jsonl line 1 is not JSON"),
    ('{"text": "a"}\n[1, 2]\n', "posts.jsonl", "posts.jsonl record 2 has no text field"),
    (b'{"text": "caf\xe9"}\n', "posts.jsonl", "posts.jsonl is not UTF-8"),
    ('id,text\n1,"' + "x" * 200_000 + '"\n', "posts.csv", "posts.csv record 1 is not CSV"),
    ("id,text\n1,ok\n2,\"never closed\n" + "more\n" * 50_000, "posts.csv", "posts.csv record 2 is not CSV"),
])
def test_a_broken_posts_file_gets_a_clear_error(body, name, error):
    with Scripted(lambda path, query: (200, {}, body)) as server:
        with pytest.raises(MalformedInput, match=error):
            open_source({"file": {"uri": f"{server.url}/{name}"}}, Storage(), {}).fetch("a", 10)


def test_a_posts_file_is_named_without_its_query():
    served = {"/posts.csv": "id,text\n1,a post\n", "/broken.jsonl": '{"text": "ok"}\nnot json\n'}
    with Scripted(lambda path, query: (200, {}, served[path]) if path in served else (404, {}, "no such file")) as server:
        got = open_source({"file": {"uri": f"{server.url}/posts.csv?sig=secret"}}, Storage(), {}).fetch("a", 10)
        assert [p.text for p in got.posts] == ["a post"]  # read as CSV: the name ends before the query
        with pytest.raises(MalformedInput, match=r"^broken\.jsonl line 2 is not JSON$"):
            open_source({"file": {"uri": f"{server.url}/broken.jsonl?sig=secret"}}, Storage(), {}).fetch("a", 10)
        with pytest.raises(MissingInput, match=r"no posts file at http://127\.0\.0\.1:\d+/gone\.jsonl, or") as failed:
            open_source({"file": {"uri": f"{server.url}/gone.jsonl?sig=secret"}}, Storage(), {}).fetch("a", 10)
        assert "secret" not in str(failed.value)


def test_a_posts_file_beyond_the_byte_cap_fails_naming_the_cap(monkeypatch):
    with Scripted(lambda path, query: (200, {}, posts_jsonl(40_000))) as server:  # about 3 MB
        with pytest.raises(MalformedInput, match=r"posts\.jsonl is larger than 1,048,576 bytes.*files\.MAX_FILE_BYTES"):
            FileSource(f"{server.url}/posts.jsonl", Storage().stream, max_bytes=2**20).fetch("alice", 10)
    monkeypatch.setattr(files, "MAX_LINE_CHARACTERS", 1000)
    with Scripted(lambda path, query: (200, {}, '{"text": "' + "x" * 5000 + '"}\n')) as server:
        with pytest.raises(MalformedInput, match=r"posts\.jsonl line 1 is longer than 1,000 characters"):
            FileSource(f"{server.url}/posts.jsonl", Storage().stream).fetch("alice", 10)


@pytest.mark.parametrize("name", ["posts.jsonl", "posts.csv"])
def test_a_large_posts_file_is_read_in_little_memory(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("handle,id,text\n" + "".join(f"{('alice', 'bob')[i % 2]},{i},post {i} says a & b <3 {'w' * 60}\n"
                                                   for i in range(100_000)))
    else:
        path.write_text(posts_jsonl(100_000))
    size, storage = path.stat().st_size, Storage()
    got, peak = traced_peak(lambda: FileSource(str(path), lambda uri: storage.stream(uri, chunk_size=64 * 1024)).fetch("bob", 100))
    assert [p.id for p in got.posts[:2]] == ["1", "3"] and len(got.posts) == 100
    # A few chunks and the handle's first 100 posts, not the file.
    assert peak < size / 10, f"peak {peak:,} bytes for a {size:,}-byte file"


def x_user_then(timeline_answer):
    def answer(path, query):
        if path.startswith("/2/users/by/username/"):
            return 200, {}, {"data": {"id": "1", "name": "A", "username": "a"}}
        return timeline_answer(path, query)
    return answer


def test_retry_after_zero_forever_ends_with_a_clear_error():
    slept = []
    with Scripted(x_user_then(lambda path, query: (429, {"Retry-After": "0"}, {"title": "Too Many Requests"}))) as server:
        with pytest.raises(RateLimited, match=r"answered 429 \d+ times in a row"):
            XApiSource(server.url, "t", sleep=slept.append, **FAST).fetch("a", 100)
    assert 1 < len(server.requests) <= 1 + MAX_RATE_LIMITED
    assert slept and min(slept) >= MIN_RATE_LIMIT_WAIT


def test_a_timeline_that_never_ends_is_cut_off():
    # X: a next_token with no posts, a new one each time.
    with Scripted(x_user_then(lambda path, query: (200, {}, {"meta": {"result_count": 0, "next_token": f"t{len(query)}{query.get('pagination_token', '')}"}}))) as server:
        with pytest.raises(StageError, match=r"pages in a row without posts"):
            XApiSource(server.url, "t", **FAST).fetch("a", 100)
        assert len(server.requests) <= 1 + MAX_EMPTY_PAGES
    # Bluesky: posts, but the same cursor again and again.
    post = {"post": {"uri": "at://x/1", "author": {"displayName": "A"}, "record": {"text": "a post", "createdAt": ""}}}
    with Scripted(lambda path, query: (200, {}, {"feed": [post], "cursor": "same"})) as server:
        with pytest.raises(StageError, match="the same cursor twice"):
            BlueskySource(server.url, **FAST).fetch("a", 10_000)
        assert len(server.requests) == 2
    # Mastodon: statuses and a Link to the same max_id.
    def mastodon(path, query):
        if path.endswith("/lookup"):
            return 200, {}, {"id": "1", "display_name": "A"}
        return 200, {"Link": f'<{server.url}/api/v1/accounts/1/statuses?max_id=5>; rel="next"'}, [{"id": "9", "content": "<p>hi</p>"}]
    with Scripted(mastodon) as server:
        with pytest.raises(StageError, match="the same cursor twice"):
            MastodonSource(server.url, **FAST).fetch("a", 10_000)


def test_paging_bounds(monkeypatch):
    pages = Pages("the X API for @a")
    for number in range(MAX_EMPTY_PAGES - 1):
        pages.follow(0, f"empty-{number}")
    pages.follow(1, "with-a-post")  # a page with posts starts the count again
    with pytest.raises(StageError, match="the X API for @a returned the same cursor twice"):
        pages.follow(1, "with-a-post")
    monkeypatch.setattr(sources, "MAX_PAGES", 3)
    pages = Pages("x")
    pages.follow(1, "a")
    pages.follow(1, "b")
    with pytest.raises(StageError, match="more than 3 pages"):
        pages.follow(1, "c")


def test_a_timeline_cannot_take_longer_than_the_time_budget(server):
    now = [1_000_000.0]

    def clock():
        now[0] += 60
        return now[0]

    with pytest.raises(NetworkFailure, match=r"more than its 600s time budget"):
        XApiSource(server.url, server.x_bearer_token, clock=clock, time_budget=600, **FAST).fetch("prolific", 3200)


@pytest.mark.parametrize("url, redacted", [
    ("https://user:pass@host.example:8443/a/b?token=secret#frag", "https://host.example:8443/a/b"),
    ("s3://bucket/key/tweets.js?versionId=1", "s3://bucket/key/tweets.js"),
    ("http://[::1]:8080/p?x=1", "http://[::1]:8080/p"),
    ("http://token@host", "http://host"),
    ("/local/path/tweets.js", "/local/path/tweets.js"),
])
def test_urls_in_messages_keep_only_scheme_host_port_and_path(url, redacted):
    assert redact_url(url) == redacted
    assert redact_urls(f"failed: {url} (and {url})") == f"failed: {redacted} (and {redacted})"


def test_no_error_message_carries_userinfo_or_a_query_string():
    secrets = ("user", "pass", "secret")
    with Scripted(lambda path, query: (404 if "missing" in path else 500, {}, {"error": "x"})) as server:
        base = server.url.replace("http://", "http://user:pass@")
        failures = [
            lambda: XApiSource("http://user:pass@127.0.0.1:9/?token=secret", "t", **FAST).fetch("a", 10),
            lambda: XApiSource(f"{base}/?token=secret", "t", **FAST).fetch("a", 10),
            lambda: MastodonSource(f"{base}/?token=secret", **FAST).fetch("missing", 10),
            lambda: Storage().read(f"{base}/missing.jsonl?token=secret"),
            lambda: Storage().read(f"{base}/broken.jsonl?token=secret"),
            lambda: XArchiveSource(f"{base}/{{handle}}/tweets.js?token=secret", Storage().stream).fetch("a", 10),
            lambda: XArchiveSource(f"{base}/{{handle}}/tweets.js?token=secret", Storage().stream).fetch("missing", 10),
        ]
        for number, fail in enumerate(failures):
            with pytest.raises(Exception) as failed:
                fail()
            assert not any(secret in str(failed.value) for secret in secrets), (number, str(failed.value))
            assert "127.0.0.1" in str(failed.value), (number, str(failed.value))


def test_a_stage_result_carries_no_userinfo_or_query_string(tmp_path):
    with Scripted(lambda path, query: (500, {}, {"error": "x"})) as server:
        archive = server.url.replace("http://", "http://user:pass@") + "/{handle}/tweets.js?token=secret"
        request = StageRequest(stage="scrape", run_id="r", namespace="n", bot="b", handles=["a"],
                               s3=S3Layout(bucket="b", prefix="p", namespace="n", bot="b", run_id="r"),
                               source={"xArchive": {"uri": archive}})
        env = {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "TWEETBOT_TERMINATION_MESSAGE_PATH": str(tmp_path / "log")}
        finished = subprocess.run([sys.executable, "-m", "tweetbot_trainer.cli", "scrape"], env=env,
                                  capture_output=True, text=True, timeout=120)
    result = StageResult.from_termination_message((tmp_path / "log").read_text())
    assert finished.returncode != 0 and not result.ok and "127.0.0.1" in result.error
    assert not any(secret in result.error for secret in ("user", "pass", "secret")), result.error
