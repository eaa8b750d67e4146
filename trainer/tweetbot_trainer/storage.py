"""S3 (and URL) I/O of the stages. Each stage writes its files, then a manifest last: a reader that finds
the manifest finds complete files, so a stage can be re-run or resumed at any point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import requests
from botocore.config import Config
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from .errors import NetworkFailure


TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=8)


def split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


class Storage:
    def __init__(self, endpoint: str = "", region: str = "us-east-1"):
        # Credentials come from the environment (AWS_ACCESS_KEY_ID/..., filled from the bot's Secret) or the
        # pod's own identity; AWS_ENDPOINT_URL works too when no endpoint is given.
        self.s3 = boto3.client("s3", endpoint_url=endpoint or None, region_name=region,
                               config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def read(self, uri: str) -> bytes:
        """Bytes at an s3:// URI, an http(s):// URL or a local path; FileNotFoundError if there is none."""
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            try:
                return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as error:
                if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    raise FileNotFoundError(uri) from None
                raise
        if uri.startswith(("http://", "https://")):
            try:
                response = requests.get(uri, timeout=60)
            except requests.RequestException as error:
                raise NetworkFailure(f"cannot fetch {urlsplit(uri).netloc} ({type(error).__name__})") from None
            if response.status_code == 404:
                raise FileNotFoundError(uri)
            response.raise_for_status()
            return response.content
        return Path(uri).read_bytes()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)

    def list_keys(self, bucket: str, prefix: str, suffix: str = "") -> list[str]:
        keys = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(suffix)]
        return keys

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        keys = self.list_keys(bucket, prefix)
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})

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

    def upload_directory(self, local: Path, bucket: str, prefix: str, manifest_key: str) -> dict:
        """Upload every file under `local` (multipart for large ones), then the manifest naming them."""
        manifest = {"files": {}}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            self.s3.upload_file(str(path), bucket, prefix + relative, Config=TRANSFER)
            manifest["files"][relative] = {"bytes": path.stat().st_size}
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
