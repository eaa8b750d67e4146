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
from botocore.exceptions import ClientError

from .errors import NetworkFailure


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

    def write_all(self, bucket: str, files: dict[str, bytes], manifest_key: str) -> dict:
        """Write `files` (key -> bytes), then a manifest naming each with its size and sha256."""
        manifest = {"files": {}}
        for key, data in files.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
            manifest["files"][key] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.s3.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest, indent=1).encode())
        return manifest
