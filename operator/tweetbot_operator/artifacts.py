"""Deleting a bot's S3 artifacts when its deletionPolicy is Delete."""

from __future__ import annotations

import boto3
from botocore.config import Config

from tweetbot_trainer.contract import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV, S3Layout


def bot_prefix(bot: dict) -> S3Layout:
    """Every run of the bot lives under this layout's run_prefix (run id left empty)."""
    s3 = bot["spec"]["output"]["s3"]
    return S3Layout(
        bucket=s3["bucket"], prefix=s3.get("prefix", "tweetbot"), namespace=bot["metadata"]["namespace"],
        bot=bot["metadata"]["name"], run_id="", endpoint=s3.get("endpoint", ""), region=s3.get("region", "us-east-1"),
    )


def delete_artifacts(layout: S3Layout, credentials: dict[str, str] | None) -> int:
    """Delete every object under the bot's prefix; returns how many. Raises on any S3 error."""
    keys = {}
    if credentials:
        keys = {"aws_access_key_id": credentials[S3_ACCESS_KEY_ENV], "aws_secret_access_key": credentials[S3_SECRET_KEY_ENV]}
    s3 = boto3.client(
        "s3", endpoint_url=layout.endpoint or None, region_name=layout.region,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}), **keys,
    )
    deleted = 0
    # The trailing slash keeps bot "a" from deleting the artifacts of bot "ab".
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=layout.bucket, Prefix=layout.run_prefix + "/"):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=layout.bucket, Delete={"Objects": objects, "Quiet": True})
            deleted += len(objects)
    return deleted
