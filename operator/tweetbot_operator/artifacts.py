"""The operator's few S3 reads and writes: live training progress, and deleting a bot's artifacts."""

from __future__ import annotations

import functools

import boto3
from botocore.config import Config

from botocore.exceptions import BotoCoreError, ClientError

from tweetbot_trainer.contract import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV, ContractError, Progress, S3Layout


def s3_client(layout: S3Layout, credentials: dict[str, str] | None):
    keys = ()
    if credentials:
        keys = (credentials[S3_ACCESS_KEY_ENV], credentials[S3_SECRET_KEY_ENV])
    return _client(layout.endpoint, layout.region, keys)


@functools.lru_cache(maxsize=64)
def _client(endpoint: str, region: str, keys: tuple[str, ...]):
    """One client per endpoint and identity: building a boto3 client costs tens of milliseconds of CPU."""
    access_keys = {"aws_access_key_id": keys[0], "aws_secret_access_key": keys[1]} if keys else {}
    return boto3.client(
        "s3", endpoint_url=endpoint or None, region_name=region,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}), **access_keys,
    )


def read_progress(layout: S3Layout, credentials: dict[str, str] | None) -> Progress | None:
    """The train stage's latest progress report, or None if there is none (yet) or it cannot be read."""
    try:
        body = s3_client(layout, credentials).get_object(Bucket=layout.bucket, Key=layout.progress)["Body"].read()
        return Progress.from_json(body.decode())
    except (BotoCoreError, ClientError, ContractError, UnicodeDecodeError):
        return None


def delete_artifacts(layout: S3Layout, credentials: dict[str, str] | None) -> int:
    """Delete every object under the bot's prefix; returns how many. Raises on any S3 error."""
    s3 = s3_client(layout, credentials)
    deleted = 0
    # The trailing slash keeps bot "a" from deleting the artifacts of bot "ab".
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=layout.bucket, Prefix=layout.run_prefix + "/"):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=layout.bucket, Delete={"Objects": objects, "Quiet": True})
            deleted += len(objects)
    return deleted
