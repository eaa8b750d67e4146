"""The local S3 server is a real S3: boto3 talks to it over HTTP, multipart included."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


@pytest.fixture
def s3(dev_env):
    return boto3.client(
        "s3",
        endpoint_url=dev_env.s3_endpoint,
        aws_access_key_id=dev_env.s3_access_key,
        aws_secret_access_key=dev_env.s3_secret_key,
        region_name="us-east-1",
    )


@pytest.fixture
def bucket(s3, request):
    name = f"test-{request.node.name.replace('_', '-')[:40]}".lower()
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=item["Key"])
    s3.delete_bucket(Bucket=name)


def test_put_list_get(s3, bucket):
    s3.put_object(Bucket=bucket, Key="ns/bot/run-1/dataset.jsonl", Body=b'{"text": "hi"}\n')
    s3.put_object(Bucket=bucket, Key="ns/bot/run-1/stats.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="ns/other/run-1/stats.json", Body=b"{}")

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="ns/bot/")
    assert sorted(item["Key"] for item in listed["Contents"]) == [
        "ns/bot/run-1/dataset.jsonl",
        "ns/bot/run-1/stats.json",
    ]
    assert s3.get_object(Bucket=bucket, Key="ns/bot/run-1/dataset.jsonl")["Body"].read() == b'{"text": "hi"}\n'
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket=bucket, Key="ns/bot/run-2/stats.json")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


def test_multipart_upload_by_hand(s3, bucket):
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123)]  # S3's minimum part is 5 MiB
    upload = s3.create_multipart_upload(Bucket=bucket, Key="checkpoint/model.safetensors")
    etags = [
        s3.upload_part(
            Bucket=bucket, Key="checkpoint/model.safetensors", UploadId=upload["UploadId"], PartNumber=number, Body=data
        )["ETag"]
        for number, data in enumerate(parts, start=1)
    ]
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # invisible until completed
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="checkpoint/model.safetensors",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": n} for n, etag in enumerate(etags, start=1)]},
    )
    stored = s3.get_object(Bucket=bucket, Key="checkpoint/model.safetensors")
    assert stored["ETag"].strip('"').endswith("-3")  # S3's multipart ETag names the part count
    assert hashlib.sha256(stored["Body"].read()).digest() == hashlib.sha256(b"".join(parts)).digest()


def test_managed_transfer_uses_multipart(s3, bucket, tmp_path):
    source = tmp_path / "optimizer.pt"
    source.write_bytes(os.urandom(12 * MiB))
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    s3.upload_file(str(source), bucket, "checkpoint/optimizer.pt", Config=config)
    head = s3.head_object(Bucket=bucket, Key="checkpoint/optimizer.pt")
    assert head["ContentLength"] == 12 * MiB
    assert head["ETag"].strip('"').endswith("-3")
    target = tmp_path / "downloaded.pt"
    s3.download_file(bucket, "checkpoint/optimizer.pt", str(target), Config=config)
    assert target.read_bytes() == source.read_bytes()


def test_wrong_credentials_are_refused(dev_env):
    intruder = boto3.client(
        "s3",
        endpoint_url=dev_env.s3_endpoint,
        aws_access_key_id=dev_env.s3_access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as refused:
        intruder.list_buckets()
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
