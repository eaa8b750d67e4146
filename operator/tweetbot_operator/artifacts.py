"""The operator's few S3 reads and writes: live training progress, and deleting a bot's artifacts."""

from __future__ import annotations

import functools
import os
import time
from urllib.parse import quote

import boto3
import botocore.session
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tweetbot_trainer.contract import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV, ContractError, Progress, S3Layout

PROGRESS_BYTES = 64 * 1024  # a report is about 150 bytes
PROGRESS_SECONDS = 5.0


def s3_client(layout: S3Layout, credentials: dict[str, str] | None):
    keys = ()
    if credentials:
        keys = (credentials[S3_ACCESS_KEY_ENV], credentials[S3_SECRET_KEY_ENV])
    return _client(layout.endpoint, layout.region, keys)


@functools.lru_cache(maxsize=64)
def _client(endpoint: str, region: str, keys: tuple[str, ...]):
    """One client per endpoint and identity, for deletions only: building one costs tens of milliseconds of
    CPU and about 15 MB."""
    access_keys = {"aws_access_key_id": keys[0], "aws_secret_access_key": keys[1]} if keys else {}
    return boto3.client(
        "s3", endpoint_url=endpoint or None, region_name=region,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}), **access_keys,
    )


def read_progress(layout: S3Layout, credentials: dict[str, str] | None) -> Progress | None:
    """The train stage's latest progress report, or None if there is none (yet) or it cannot be read.

    One SigV4-signed GET, not a boto3 client: a client loads botocore's endpoint and S3 models, 15-25 MB the
    operator would hold for good (measured in its peak RSS at 1,000 bots) to read one small object. The read
    is bounded in bytes and in total time, so a slow or huge answer cannot hold a reconcile worker.
    """
    signing = Credentials(credentials[S3_ACCESS_KEY_ENV], credentials[S3_SECRET_KEY_ENV]) if credentials \
        else _default_credentials()
    if signing is None:
        return None
    request = AWSRequest(method="GET", url=object_url(layout, layout.progress))
    S3SigV4Auth(signing, "s3", layout.region).add_auth(request)
    deadline = time.monotonic() + PROGRESS_SECONDS
    try:
        response = _http().request("GET", request.url, headers=dict(request.headers), retries=False,
                                   redirect=False, preload_content=False,
                                   timeout=urllib3.Timeout(connect=PROGRESS_SECONDS, read=PROGRESS_SECONDS))
        try:
            if response.status != 200:
                return None
            body = b""
            while chunk := response.read1(4096):  # whatever has arrived: read() would wait for all 4096
                body += chunk
                if len(body) > PROGRESS_BYTES or time.monotonic() > deadline:
                    return None
            return Progress.from_json(body.decode())
        finally:
            response.release_conn()
    except (urllib3.exceptions.HTTPError, ContractError, UnicodeDecodeError, OSError):
        return None


def object_url(layout: S3Layout, key: str) -> str:
    """Where an object is, addressed as boto3 would: path style on a given endpoint (MinIO and most S3
    servers), virtual-hosted on AWS unless the bucket name has dots (they break the TLS wildcard)."""
    endpoint = layout.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = quote(key, safe="/~")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{layout.bucket}/{key}"
    if "." in layout.bucket:
        return f"https://s3.{layout.region}.amazonaws.com/{layout.bucket}/{key}"
    return f"https://{layout.bucket}.s3.{layout.region}.amazonaws.com/{key}"


@functools.cache
def _default_credentials():
    """The pod's own identity (environment, web identity, instance profile), resolved once and refreshed by botocore."""
    return botocore.session.get_session().get_credentials()


@functools.cache
def _http() -> urllib3.PoolManager:
    return urllib3.PoolManager(maxsize=4, ca_certs=os.environ.get("AWS_CA_BUNDLE"))


def delete_artifacts(layouts: list[S3Layout], credentials: dict[str, str] | None, deadline_seconds: float) -> int:
    """Delete every object of the given runs (one bucket); returns how many. Raises on any S3 error, on any
    key S3 did not delete, and when the deadline passes with objects left (the caller tries again)."""
    s3 = s3_client(layouts[0], credentials)
    deadline = time.monotonic() + deadline_seconds
    deleted = 0
    for layout in layouts:
        # The trailing slash keeps run "a" from reaching run "ab".
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=layout.bucket, Prefix=layout.run_prefix + "/"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"deleted {deleted} objects in {deadline_seconds:.0f}s; more are left")
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                answer = s3.delete_objects(Bucket=layout.bucket, Delete={"Objects": objects, "Quiet": True})
                errors = answer.get("Errors") or []
                if errors:
                    raise RuntimeError(f"S3 did not delete {len(errors)} of {len(objects)} objects "
                                       f"(first: {errors[0].get('Key')}: {errors[0].get('Code')})")
                deleted += len(objects)
    return deleted
