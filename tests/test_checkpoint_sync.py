"""Checkpoint uploads off the training thread: a failure stops training at the next step, local copies go once
S3 holds them, and at most `keep` wait on local disk. Fake uploads here; the real S3 in test_train_stage.py."""

from __future__ import annotations

import threading

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from tweetbot_trainer.storage import S3Failure, s3_error_code
from tweetbot_trainer.errors import CheckpointUploadFailed
from tweetbot_trainer.checkpoints import CheckpointUploads, checkpoint_step, uploaded_local_checkpoints


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "refused"}}, "PutObject")


def test_the_s3_error_code_is_found_wherever_boto_wrapped_it():
    assert s3_error_code(client_error("AccessDenied")) == "AccessDenied"
    try:  # boto3's upload_file raises S3UploadFailedError while handling the ClientError
        try:
            raise client_error("NoSuchBucket")
        except ClientError as error:
            raise S3UploadFailedError(f"Failed to upload /tmp/x to b/k: {error}")
    except S3UploadFailedError as wrapped:
        assert s3_error_code(wrapped) == "NoSuchBucket"
    # Its message carries the request's URL and query string: the class name says enough.
    unreachable = EndpointConnectionError(endpoint_url="http://s3.local:9000/b/k?uploads&X-Amz-Credential=secret")
    assert s3_error_code(unreachable) == "EndpointConnectionError"
    failure = S3Failure("upload to", "b", "runs/checkpoint-3/model.safetensors", s3_error_code(unreachable))
    assert str(failure) == "upload to s3://b/runs/checkpoint-3/model.safetensors failed: EndpointConnectionError"


def test_checkpoint_steps_from_directory_names_and_manifest_keys():
    assert checkpoint_step("checkpoint-12") == 12
    assert checkpoint_step("tweetbot/bots/dreamer/run-a/checkpoints/checkpoint-40/manifest.json") == 40


def test_local_copies_go_up_to_the_newest_uploaded_step_only():
    assert uploaded_local_checkpoints([6, 2, 4, 8], newest_uploaded=4) == [2, 4]
    assert uploaded_local_checkpoints([2, 4], newest_uploaded=None) == []
    assert uploaded_local_checkpoints([], newest_uploaded=10) == []


def saved(directory, *steps):
    for step in steps:
        (directory / f"checkpoint-{step}").mkdir()
        (directory / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x" * 10)


def on_disk(directory) -> list[int]:
    return sorted(checkpoint_step(path.name) for path in directory.glob("checkpoint-*"))


class Uploads:
    """A fake upload: records the steps, blocks on a step's gate until it is opened, fails a chosen step."""

    def __init__(self, fail: int | None = None):
        self.fail, self.done = fail, []
        self.gates: dict[int, threading.Event] = {}

    def gate(self, step: int) -> threading.Event:
        return self.gates.setdefault(step, threading.Event())

    def __call__(self, local, step):
        assert local.is_dir(), "a checkpoint was deleted before its upload"
        if step in self.gates:
            self.gates[step].wait(timeout=10)
        if step == self.fail:
            raise S3Failure("upload to", "bots", f"run/checkpoints/checkpoint-{step}/model.safetensors", "AccessDenied")
        self.done.append(step)


def test_a_failed_upload_stops_training_at_the_next_check_and_names_the_object(tmp_path):
    fake = Uploads(fail=2)
    uploads = CheckpointUploads(tmp_path, fake, keep=3)
    saved(tmp_path, 1, 2, 3)
    fake.gate(3)
    for step in (1, 2, 3):
        uploads.submit(step)
    with pytest.raises(CheckpointUploadFailed) as failed:
        for _ in range(1000):
            uploads.check()
            threading.Event().wait(0.01)
    assert failed.value.message == ("saving checkpoint 2 to S3: upload to s3://bots/run/checkpoints/checkpoint-2/model.safetensors "
                                    "failed: AccessDenied")
    assert fake.done == [1]  # the upload after the failed one is skipped (its gate never opens)
    assert {2, 3} <= set(on_disk(tmp_path))  # the failed one and the newer one stay


def test_uploaded_checkpoints_leave_the_disk_and_pending_ones_stay(tmp_path):
    fake = Uploads()
    uploads = CheckpointUploads(tmp_path, fake, keep=2, uploaded=1)
    saved(tmp_path, 1)  # downloaded to resume from: S3 holds it
    uploads.check()
    assert on_disk(tmp_path) == []
    saved(tmp_path, 2, 3)
    fake.gate(3)
    uploads.submit(2)
    uploads.submit(3)
    for _ in range(1000):
        if fake.done == [2]:
            break
        threading.Event().wait(0.01)
    uploads.check()
    assert on_disk(tmp_path) == [3]  # 3 is still uploading
    fake.gate(3).set()
    uploads.wait()
    assert on_disk(tmp_path) == []


def test_a_save_waits_while_keep_checkpoints_are_still_uploading(tmp_path):
    fake = Uploads()
    uploads = CheckpointUploads(tmp_path, fake, keep=2)
    saved(tmp_path, 1, 2)
    fake.gate(1)
    uploads.submit(1)
    uploads.submit(2)
    room = threading.Thread(target=uploads.make_room)
    room.start()
    room.join(timeout=0.3)
    assert room.is_alive(), "a third checkpoint would be saved while two are on disk"
    fake.gate(1).set()
    room.join(timeout=10)
    assert not room.is_alive() and fake.done[0] == 1
    assert 1 not in on_disk(tmp_path)  # on the training thread, the room made is freed at once
    uploads.wait()


def test_a_failure_met_while_making_room_is_raised(tmp_path):
    uploads = CheckpointUploads(tmp_path, Uploads(fail=1), keep=1)
    saved(tmp_path, 1)
    uploads.submit(1)
    with pytest.raises(CheckpointUploadFailed, match="saving checkpoint 1 to S3"):
        uploads.make_room()
    assert on_disk(tmp_path) == [1]
