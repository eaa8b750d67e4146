"""spec.output.hub.checkpoints: the train stage pushes each checkpoint, once S3 holds it, to a branch of the bot's
repository on the local Hub; `main` gets only the published model, and a failing Hub never fails training."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from test_publish_stage import publish
from test_train_stage import checkpoint_steps, posts, put_dataset, request_for, start_train
from tweetbot_dev.fake_hub import FakeHub
from tweetbot_dev.tiny_model import build_tiny_gpt2
from tweetbot_trainer.contract import HUB_PUSH_TOKEN_ENV, StageResult

pytestmark = pytest.mark.s3

PUSH_TOKEN, READ_TOKEN = "hf_push_alice", "hf_read_bob"
STATS = {"network": "X", "collectedAt": "2026-11-22T10:00:00Z", "handles": [
    {"handle": "dreamer", "displayName": "Dreamer", "downloaded": 300, "retweets": 0, "short": 0, "kept": 300}]}


@pytest.fixture(scope="module")
def world(dev_env, new_bucket, tmp_path_factory):
    """The real S3 and a local Hub where bob keeps a private base model and alice's token pushes the bot's repo."""
    from huggingface_hub import HfApi

    s3, bucket = new_bucket("hubckpt")
    model_dir = build_tiny_gpt2(tmp_path_factory.mktemp("tiny"), posts(400))
    for path in model_dir.iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny-gpt2/{path.name}")
    with FakeHub(tokens={PUSH_TOKEN: "alice", READ_TOKEN: "bob"}) as hub:
        bob = HfApi(endpoint=hub.url, token=READ_TOKEN)
        bob.create_repo("bob/tiny-base", private=True)
        bob.upload_folder(repo_id="bob/tiny-base", folder_path=model_dir, commit_message="tiny base")
        yield dev_env, s3, bucket, hub


def hub_env(hub, tmp_path, **more) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", **more}


def test_the_branch_holds_the_newest_checkpoint_and_main_only_the_final_model(world, tmp_path):
    dev_env, s3, bucket, hub = world
    request = request_for(bucket, dev_env.s3_endpoint, "hub-a", epochs=2,
                          checkpoint={"everySteps": 3, "everyMinutes": 60, "keep": 2})
    # The base model is bob's private one: only the read token in HF_TOKEN can load it.
    request = replace(request, model={"name": "bob/tiny-base", "revision": "main"},
                      hub={"checkpoints": True, "checkpointBranch": "checkpoints", "private": False, "endpoint": hub.url})
    put_dataset(s3, bucket, request.s3, 300)
    s3.put_object(Bucket=bucket, Key=request.s3.stats, Body=json.dumps(STATS).encode())
    hub.callers.clear()
    process = start_train(dev_env, request, tmp_path, **hub_env(hub, tmp_path, HF_TOKEN=READ_TOKEN,
                                                                **{HUB_PUSH_TOKEN_ENV: PUSH_TOKEN}))
    assert process.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    result = StageResult.from_termination_message((tmp_path / "termination-log").read_text())

    repo = hub.repos["alice/dreamer"]  # the token owner's, named by the handles: the repo publish writes
    steps = checkpoint_steps(s3, bucket, request.s3)
    total_steps = 2 * -(-54 // 8)  # epochs x steps per epoch (54 blocks, batch 8)
    assert steps == [9, 12] and total_steps == 14
    branch = repo.branch("checkpoints")
    assert result.artifacts["hubCheckpointRevision"] == f"checkpoints@{branch.id}"
    assert [commit.message for commit in repo.history("checkpoints")] == [
        "initial commit", *(f"TweetBot checkpoint step {step} of run hub-a" for step in (3, 6, 9, 12))]
    # Exactly the newest checkpoint: its trainer state, its ZeRO shards and nothing of the ones before.
    assert json.loads(branch.files["trainer_state.json"])["global_step"] == 12
    assert {"config.json", "model.safetensors"} <= set(branch.files)  # from_pretrained(repo, revision="checkpoints")
    assert {path.split("/")[0] for path in branch.files if path.startswith("global_step")} == {"global_step12"}
    assert any("optim_states" in path for path in branch.files)
    assert repo.head.message == "initial commit" and not repo.head.files  # nothing on main before publishing

    # Each token went where it belongs: downloads of the base model with bob's read token, pushes with alice's.
    assert {user for user, request_line in hub.callers if "bob/tiny-base" in request_line} == {"bob"}
    assert {user for user, request_line in hub.callers if "alice/dreamer" in request_line or "whoami" in request_line} == {"alice"}
    log = (tmp_path / "train.log").read_text()
    assert PUSH_TOKEN not in log and READ_TOKEN not in log

    finished, published = publish(dev_env, request.s3, tmp_path, hub={"private": False, "endpoint": hub.url},
                                  extra_env=hub_env(hub, tmp_path, HF_TOKEN=PUSH_TOKEN), handles=["dreamer"])
    assert finished.returncode == 0, finished.stderr
    assert published.artifacts["hubCommit"] == repo.head.id
    assert {"README.md", "model.safetensors", "config.json"} <= set(repo.head.files)
    assert not [path for path in repo.head.files if "global_step" in path or path.startswith(("trainer_state", "optimizer", "rng_state"))]
    assert repo.branch("checkpoints").id == branch.id  # publishing leaves the checkpoint branch alone


@pytest.mark.parametrize("failure, hub_spec, reason", [
    ("500", {}, "StageError: the Hub answered 500 trying to read the token owner"),
    ("403", {"repoId": "someoneelse/dreamer"}, "HubForbidden: the token may not create someoneelse/dreamer (403)"),
])
def test_a_failing_hub_does_not_fail_training(world, tmp_path, failure, hub_spec, reason):
    dev_env, s3, bucket, hub = world
    request = request_for(bucket, dev_env.s3_endpoint, f"hub-{failure}", epochs=1,
                          checkpoint={"everySteps": 2, "everyMinutes": 60, "keep": 2})
    request = replace(request, hub={"checkpoints": True, "checkpointBranch": "checkpoints", "endpoint": hub.url, **hub_spec})
    put_dataset(s3, bucket, request.s3, 300)
    hub.failing = 500 if failure == "500" else None
    try:
        process = start_train(dev_env, request, tmp_path, **hub_env(hub, tmp_path, **{HUB_PUSH_TOKEN_ENV: PUSH_TOKEN}))
        assert process.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    finally:
        hub.failing = None
    result = StageResult.from_termination_message((tmp_path / "termination-log").read_text())
    assert result.ok and result.metrics["steps"] == 7 and "hubCheckpointRevision" not in result.artifacts
    assert checkpoint_steps(s3, bucket, request.s3) == [4, 6]  # S3, the record, has them all the same
    log = (tmp_path / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "not pushed to the Hub" in line]
    assert len(warnings) == 1 and reason in warnings[0], warnings  # once, not at each of the 3 checkpoints
    assert "WARNING" in warnings[0] and PUSH_TOKEN not in log
