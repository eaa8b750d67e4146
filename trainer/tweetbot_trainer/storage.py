"""S3 (and URL) I/O of the stages. Each stage writes its files, then a manifest last: a reader that finds
the manifest finds complete files, so a stage can be re-run or resumed at any point."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import boto3
import requests
from botocore.config import Config
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from .errors import NetworkFailure, redact_url


CHUNK_BYTES = 1 << 20  # what `stream` holds of a file at a time
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=8)


def split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


class S3Failure(Exception):
    """An S3 request that failed after its retries, told by object and S3's error code: boto's own messages
    can carry the request's URL and query string."""

    def __init__(self, action: str, bucket: str, key: str, code: str):
        super().__init__(f"{action} s3://{bucket}/{key} failed: {code}")
        self.code = code


def s3_error_code(error: BaseException) -> str:
    """S3's error code (AccessDenied, NoSuchBucket, ...) from the ClientError behind `error`, which boto3's
    transfers wrap in errors of their own; otherwise the class name (EndpointConnectionError, ...)."""
    seen = error
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen.response.get("Error", {}).get("Code") or type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__


@contextmanager
def _told_as_s3_failure(action: str, bucket: str, key: str):
    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as error:
        raise S3Failure(action, bucket, key, s3_error_code(error)) from None


READ_DEADLINE_SECONDS = 600.0  # one network read: socket timeouts bound each silence, not a byte a minute


def _http_chunks(uri: str, chunk_size: int, shown: str) -> Iterator[bytes]:
    try:
        response = requests.get(uri, timeout=60, stream=True)
    except requests.RequestException as error:
        raise NetworkFailure(f"cannot fetch {shown} ({type(error).__name__})") from None
    with response:
        if response.status_code in (404, 410):
            raise FileNotFoundError(shown)
        if response.status_code in (401, 403):
            raise PermissionError(f"{shown} ({response.status_code})")
        if response.status_code != 200:
            raise NetworkFailure(f"{shown} answered {response.status_code}")
        try:
            yield from response.iter_content(chunk_size)
        except requests.RequestException as error:
            raise NetworkFailure(f"reading {shown} failed ({type(error).__name__})") from None


def _s3_chunks(s3, uri: str, chunk_size: int, shown: str) -> Iterator[bytes]:
    bucket, key = split_s3_uri(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(shown) from None
        if code in ("AccessDenied", "403"):
            raise PermissionError(f"{shown} ({code})") from None
        raise
    with body:
        yield from body.iter_chunks(chunk_size)


def _file_chunks(file, chunk_size: int) -> Iterator[bytes]:
    with file:
        while chunk := file.read(chunk_size):
            yield chunk


_END = object()


class _ReadBeforeDeadline:
    """The chunks of a network read, read in a thread of its own and handed over through a queue of two, so the
    reader waits for the server until the deadline and no longer: a socket timeout bounds only each silence,
    and within one chunk (and the headers) a server sending a byte a minute goes on for ever. The thread,
    left behind at the deadline, ends at its next byte or socket timeout and closes the response then."""

    def __init__(self, chunks: Iterator[bytes], seconds: float, where: str):
        self._chunks, self._seconds, self._where = chunks, seconds, where
        self._deadline = time.monotonic() + seconds
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._gone = threading.Event()  # the reader stopped: the thread hands nothing more over
        threading.Thread(target=self._read, name=f"read {where}", daemon=True).start()
        self._first = self._take()  # the request's answer: FileNotFoundError and the like are raised here

    def __iter__(self) -> Iterator[bytes]:
        try:
            chunk = self._first
            while chunk is not _END:
                yield chunk
                chunk = self._take()
        finally:
            self._gone.set()

    def _read(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._hand_over(chunk):
                    return
            self._hand_over(_END)
        except BaseException as error:  # raised again in the reader's thread
            self._hand_over(error)
        finally:
            self._chunks.close()

    def _hand_over(self, item) -> bool:
        while not self._gone.is_set():
            try:
                self._queue.put(item, timeout=1)
                return True
            except queue.Full:
                pass
        return False

    def _take(self):
        try:
            item = self._queue.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            self._gone.set()
            raise NetworkFailure(f"reading from {self._where} took more than {self._seconds:g}s, the most one read "
                                 "may wait for a server (storage.READ_DEADLINE_SECONDS)") from None
        if isinstance(item, BaseException):
            self._gone.set()
            raise item
        return item


class Storage:
    def __init__(self, endpoint: str = "", region: str = "us-east-1"):
        # Credentials come from the environment (AWS_ACCESS_KEY_ID/..., filled from the bot's Secret) or the
        # pod's own identity; AWS_ENDPOINT_URL works too when no endpoint is given. A session of its own: boto3's
        # default one keeps the credentials it resolved first, whatever the environment says later.
        self.s3 = boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region,
                                                 config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def read(self, uri: str) -> bytes:
        """All bytes at an s3:// URI, an http(s):// URL or a local path (errors as `stream`)."""
        return b"".join(self.stream(uri))

    def stream(self, uri: str, chunk_size: int = CHUNK_BYTES, seconds: float | None = None) -> Iterator[bytes]:
        """The bytes at an s3:// URI, an http(s):// URL or a local path, chunk by chunk, so a large file is
        never whole in memory. The request is made at once: FileNotFoundError if there is no such file,
        PermissionError if this identity may not read it (also S3's answer for a missing key to a reader
        that may not list the bucket). NetworkFailure once the read has waited `seconds` (default
        READ_DEADLINE_SECONDS) in all for the server. Messages name the URL without userinfo or query."""
        shown = redact_url(uri)
        if uri.startswith("s3://"):
            chunks = _s3_chunks(self.s3, uri, chunk_size, shown)
        elif uri.startswith(("http://", "https://")):
            chunks = _http_chunks(uri, chunk_size, shown)
        else:
            return _file_chunks(open(uri, "rb"), chunk_size)
        where = "{0.scheme}://{0.netloc}".format(urlsplit(shown))  # the host alone: a path can carry a token
        return iter(_ReadBeforeDeadline(chunks, READ_DEADLINE_SECONDS if seconds is None else seconds, where))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)

    def list_keys(self, bucket: str, prefix: str, suffix: str = "") -> list[str]:
        keys = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(suffix)]
        return keys

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        with _told_as_s3_failure("delete", bucket, prefix):
            keys = self.list_keys(bucket, prefix)
            for start in range(0, len(keys), 1000):
                answer = self.s3.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
                # A batch delete answers 200 with the keys it could not delete listed in Errors.
                for error in (answer.get("Errors") or [])[:1]:
                    raise S3Failure("delete", bucket, error.get("Key", prefix), error.get("Code", "Error"))

    def download_prefix(self, bucket: str, prefix: str, local: Path) -> int:
        keys = self.list_keys(bucket, prefix)
        for key in keys:
            target = local / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, key, str(target), Config=TRANSFER)
        return len(keys)

    def download_files(self, bucket: str, files: dict, prefix: str, local: Path) -> None:
        """Download the files a manifest names (keys relative to `prefix`)."""
        for relative in files:
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, prefix + relative, str(target), Config=TRANSFER)

    def upload_directory(self, local: Path, bucket: str, prefix: str, manifest_key: str | None = None) -> dict:
        """Upload every file under `local` (multipart for large ones), then the manifest naming them if given a key
        for it; S3Failure names the object that failed."""
        manifest = {"files": {}}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            with _told_as_s3_failure("upload to", bucket, prefix + relative):
                self.s3.upload_file(str(path), bucket, prefix + relative, Config=TRANSFER)
            manifest["files"][relative] = {"bytes": path.stat().st_size}
        if manifest_key is not None:
            with _told_as_s3_failure("upload to", bucket, manifest_key):
                self.s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest, indent=1).encode())
        return manifest

    def write_all(self, bucket: str, files: dict[str, bytes], manifest_key: str) -> dict:
        """Write `files` (key -> bytes), then a manifest naming each with its size and sha256."""
        manifest = {"files": {}}
        for key, data in files.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
            manifest["files"][key] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest, indent=1).encode())
        return manifest
