"""Reads from servers that answer a byte at a time: each read ends by its deadline, however slow the drip."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tweetbot_trainer import storage as storage_module
from tweetbot_trainer.errors import NetworkFailure
from tweetbot_trainer.storage import Storage

BODY = b"x" * 100
INTERVAL = 0.1  # a whole answer takes 10 s (the body) to 20 s (headers and body)
DEADLINE = 1.0


class Drip:
    """A local HTTP server sending its answer one byte every `interval` seconds: the headers too, or only the
    body. S3 clients read it as an object's GET."""

    def __init__(self, body: bytes, interval: float, headers_too: bool):
        self.stopped, self.hung_up = threading.Event(), threading.Event()
        drip = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n"
                        "Connection: close\r\n\r\n").encode()
                slow = head + body if headers_too else body
                if not headers_too:
                    self.wfile.write(head)
                for index in range(len(slow)):
                    if drip.stopped.wait(interval):
                        return
                    try:
                        self.wfile.write(slow[index:index + 1])
                    except OSError:
                        drip.hung_up.set()
                        return

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        self.url = f"http://{self.host}"

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def s3_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reader-secret")


def read_from(drip: Drip, scheme: str) -> tuple[Storage, str]:
    if scheme == "s3":
        return Storage(drip.url), "s3://posts/dir/posts.jsonl"
    return Storage(), drip.url.replace("http://", "http://user:pass@") + "/dir/posts.jsonl?token=secret"


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_a_dripping_server_fails_the_read_at_its_deadline(scheme, headers_too, monkeypatch, s3_credentials):
    monkeypatch.setattr(storage_module, "READ_DEADLINE_SECONDS", DEADLINE)
    with Drip(BODY, INTERVAL, headers_too) as drip:
        storage, uri = read_from(drip, scheme)
        started = time.monotonic()
        with pytest.raises(NetworkFailure) as failed:
            storage.read(uri)
        took = time.monotonic() - started
    # Well before the drip would have ended (10 s and more), and naming the host alone.
    assert took < DEADLINE + 3, took
    message = str(failed.value)
    assert "storage.READ_DEADLINE_SECONDS" in message, message
    assert ("s3://posts" if scheme == "s3" else f"http://{drip.host}") in message, message
    assert not any(word in message for word in ("user", "pass", "secret", "token", "posts.jsonl")), message


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_a_slow_server_within_the_deadline_is_read_whole(scheme, monkeypatch, s3_credentials):
    monkeypatch.setattr(storage_module, "READ_DEADLINE_SECONDS", 30)
    with Drip(b"0123456789", 0.05, headers_too=False) as drip:
        storage, uri = read_from(drip, scheme)
        assert storage.read(uri) == b"0123456789"
        assert list(storage.stream(uri, chunk_size=4)) == [b"0123", b"4567", b"89"]


def test_a_reader_that_stops_early_releases_the_connection(monkeypatch):
    monkeypatch.setattr(storage_module, "READ_DEADLINE_SECONDS", 30)
    with Drip(b"x" * 1000, 0.01, headers_too=False) as drip:
        chunks = Storage().stream(drip.url + "/posts.jsonl", chunk_size=10)
        assert next(chunks) == b"x" * 10
        chunks.close()
        assert drip.hung_up.wait(5), "the connection was kept after the reader stopped"
