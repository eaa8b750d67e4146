"""Checkpoints in S3: each saved checkpoint uploaded in the background (manifest last), the newest `keep` complete
ones kept, and a restarted pod resuming from the newest complete one. A failed upload stops training at the
next step, and local copies are deleted once S3 holds them. No transformers here: the Trainer's callbacks
that drive this are in `hooks.py`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from .contract import S3Layout
from .errors import CheckpointUploadFailed
from .storage import S3Failure, Storage

log = logging.getLogger("tweetbot.train")


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint directory ("checkpoint-12") or of a key inside one (".../checkpoint-12/manifest.json")."""
    return int(next(part for part in reversed(name.split("/")) if part.startswith("checkpoint-")).split("-")[-1])


def uploaded_local_checkpoints(local_steps: Iterable[int], newest_uploaded: int | None) -> list[int]:
    """The local checkpoints whose copies can go: uploads run in step order, so S3 holds every step up to the
    newest uploaded one (or a newer checkpoint that replaces it), and a resume reads from S3."""
    return sorted(step for step in local_steps if newest_uploaded is not None and step <= newest_uploaded)


class CheckpointUploads:
    """Uploads the checkpoints saved under `directory`, one at a time and in step order, off the training thread.

    The training thread calls `check` at each step: a failed upload is raised there, not when training ends,
    and the local copies of uploaded checkpoints are deleted. Before a save it calls `make_room`, which waits
    while `keep` checkpoints are still uploading: the pod's disk holds at most `keep` checkpoints."""

    def __init__(self, directory: Path, upload: Callable[[Path, int], None], keep: int, uploaded: int | None = None):
        self.directory, self.upload, self.keep = directory, upload, max(1, keep)
        self.uploaded = uploaded  # the newest step S3 holds complete, a resumed one included
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[tuple[int, Future]] = []
        self.failed = False

    def submit(self, step: int) -> None:
        self.pending.append((step, self.pool.submit(self._upload, step)))

    def _upload(self, step: int) -> None:
        if self.failed:
            return  # the stage is failing: a newer upload would only delay its exit
        try:
            self.upload(self.directory / f"checkpoint-{step}", step)
        except BaseException:
            self.failed = True
            raise

    def check(self) -> None:
        self._settle(until_pending=None)

    def make_room(self) -> None:
        self._settle(until_pending=self.keep - 1)

    def wait(self) -> None:
        self._settle(until_pending=0)

    def _settle(self, until_pending: int | None) -> None:
        """Takes the finished uploads in step order, waiting for more while over `until_pending` are left."""
        while self.pending and (self.pending[0][1].done() or (until_pending is not None and len(self.pending) > until_pending)):
            step, future = self.pending.pop(0)
            error = future.exception()  # waits for it
            if error is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                told = str(error) if isinstance(error, (S3Failure, OSError)) else type(error).__name__
                raise CheckpointUploadFailed(f"saving checkpoint {step} to S3: {told}") from None
            self.uploaded = step
        for step in uploaded_local_checkpoints(self._local_steps(), self.uploaded):
            shutil.rmtree(self.directory / f"checkpoint-{step}", ignore_errors=True)

    def _local_steps(self) -> list[int]:
        return [checkpoint_step(path.name) for path in self.directory.glob("checkpoint-*") if path.is_dir()]


NODE_WAIT_SECONDS = 3600  # the first node waits this long for the others' parts of a checkpoint


class S3CheckpointStore:
    """One run's checkpoints in S3 (`S3Layout.checkpoints`): each under checkpoint-<step>/, complete once its
    manifest is written, the newest `keep` complete ones kept.

    With several nodes (pods), each uploads the files its ranks wrote and then its part of the manifest
    (nodes/<node>.json); the first node, once every node's part is there, writes the manifest naming them all.
    A part counts only if it was written by the same attempt (`resumed`: the step every node resumed from)."""

    def __init__(self, storage: Storage, layout: S3Layout, keep: int, node: int = 0, nodes: int = 1,
                 resumed: int | None = None, poll_seconds: float = 1.0):
        self.storage, self.layout, self.keep = storage, layout, keep
        self.node, self.nodes, self.resumed, self.poll_seconds = node, nodes, resumed, poll_seconds

    def prefix(self, step: int) -> str:
        return f"{self.layout.checkpoints}checkpoint-{step}/"

    def complete(self) -> list[str]:
        """The manifest keys of the complete checkpoints, oldest first."""
        keys = self.storage.list_keys(self.layout.bucket, self.layout.checkpoints, suffix="/manifest.json")
        return sorted(keys, key=checkpoint_step)

    def upload(self, local: Path, step: int) -> dict:
        """Uploads one checkpoint, manifest last, then deletes the complete ones older than the newest `keep`;
        returns what the upload took: {"step", "bytes", "seconds"}."""
        started = time.monotonic()
        prefix, manifest_key = self.prefix(step), self.prefix(step) + "manifest.json"
        if self.nodes == 1:
            manifest = self.storage.upload_directory(local, self.layout.bucket, prefix, manifest_key=manifest_key)
        else:
            manifest = self.storage.upload_directory(local, self.layout.bucket, prefix)
            part = {**manifest, "resumed": self.resumed}
            self.storage.put(self.layout.bucket, f"{prefix}nodes/{self.node}.json", json.dumps(part).encode())
            if self.node == 0:
                manifest = self._all_parts(prefix)
                self.storage.put(self.layout.bucket, manifest_key, json.dumps(manifest, indent=1).encode())
        seconds = time.monotonic() - started
        if self.node == 0:  # the pod that completes checkpoints retires the old ones
            for old in self.complete()[:-self.keep]:
                self.storage.delete_prefix(self.layout.bucket, old.rsplit("/", 1)[0] + "/")
        size = sum(file["bytes"] for file in manifest["files"].values())
        log.info("checkpoint %d uploaded to s3://%s/%s (%.0f MB in %.1fs)", step, self.layout.bucket, prefix, size / 1e6, seconds)
        return {"step": step, "bytes": size, "seconds": round(seconds, 3)}

    def _all_parts(self, prefix: str) -> dict:
        """Every node's files of one checkpoint, once every node of this attempt has uploaded its part."""
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while True:
            parts = {}
            for key in self.storage.list_keys(self.layout.bucket, prefix + "nodes/", suffix=".json"):
                part = json.loads(self.storage.read(f"s3://{self.layout.bucket}/{key}"))
                if part.get("resumed") == self.resumed:
                    parts[key] = part
            if len(parts) == self.nodes:
                return {"files": {name: file for part in parts.values() for name, file in part["files"].items()}}
            if time.monotonic() > deadline:
                raise CheckpointUploadFailed(f"{prefix}: {len(parts)} of {self.nodes} nodes uploaded their part "
                                             f"within {NODE_WAIT_SECONDS}s")
            time.sleep(self.poll_seconds)

    def download_newest(self, directory: Path) -> int | None:
        """The newest complete checkpoint downloaded to `directory`/checkpoint-<step>; its step, or None if S3 has none."""
        complete = self.complete()
        if not complete:
            return None
        step = checkpoint_step(complete[-1])
        manifest = json.loads(self.storage.read(f"s3://{self.layout.bucket}/{complete[-1]}"))
        self.storage.download_files(self.layout.bucket, manifest["files"], self.prefix(step), directory / f"checkpoint-{step}")
        log.info("resuming from checkpoint %d", step)
        return step
