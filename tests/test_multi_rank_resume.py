"""Two ranks on CPU (gloo), as a pod with two GPUs runs them: every rank's ZeRO shards reach S3, a killed run
resumes on both ranks and ends where an uninterrupted run ends, and the stage's exit code survives the launcher.
And two pods of one rank each, as a two-node training runs them: the same model as one pod of two ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors

from test_train_stage import checkpoint_steps, put_dataset, request_for
from tweetbot_dev.polling import wait_for
from tweetbot_dev.tiny_model import build_tiny_gpt2
from tweetbot_trainer.cli import pod_outcome
from tweetbot_trainer.contract import StageRequest, StageResult
from tweetbot_trainer.errors import NoUsableGPU

pytestmark = pytest.mark.s3

RANKS = 2
# 60 blocks over 2 ranks of batch 8: 4 steps an epoch.
EPOCHS, STEPS = 12, 12 * 4
CHECKPOINTS = {"everySteps": 8, "everyMinutes": 60, "keep": 2}


@pytest.fixture(scope="module")
def world(dev_env, new_bucket, tmp_path_factory):
    from test_train_stage import posts

    s3, bucket = new_bucket("ranks")
    for path in build_tiny_gpt2(tmp_path_factory.mktemp("tiny"), posts(400)).iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny-gpt2/{path.name}")
    return dev_env, s3, bucket


def two_rank_request(bucket: str, endpoint: str, run_id: str) -> StageRequest:
    """No evaluation: after a save at an epoch's end, the Trainer evaluates, and its evaluation loader draws a seed
    from the random state that a run resumed from that save does not draw: the dropout masks after it would differ."""
    request = request_for(bucket, endpoint, run_id, epochs=EPOCHS, checkpoint=CHECKPOINTS)
    return StageRequest(**{**request.__dict__, "data": {"validationFraction": 0.0}})


def start_ranks(dev_env, request: StageRequest, directory: Path) -> subprocess.Popen:
    """The train Job's command for a pod of RANKS GPUs, on CPU."""
    directory.mkdir()
    env = {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "AWS_ACCESS_KEY_ID": dev_env.s3_access_key, "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key,
           "TWEETBOT_TERMINATION_MESSAGE_PATH": str(directory / "termination-log"), "TMPDIR": str(directory)}
    command = [sys.executable, "-m", "tweetbot_trainer.cli", "train", f"--nproc-per-node={RANKS}"]
    return subprocess.Popen(command, env=env, stdout=open(directory / "train.log", "wb"), stderr=subprocess.STDOUT)


def start_pods(dev_env, request: StageRequest, directory: Path, port: int, nodes: int = RANKS) -> list[subprocess.Popen]:
    """The train Job's pods of a training on `nodes` nodes of one CPU each, as the operator starts them: each its
    own /tmp, and the PET_ variables of an Indexed Job's pod (the rendezvous on this machine instead of pod 0)."""
    pods = []
    for node in range(nodes):
        pod = directory / f"pod-{node}"
        pod.mkdir(parents=True)
        env = {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "AWS_ACCESS_KEY_ID": dev_env.s3_access_key, "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key,
               "TWEETBOT_TERMINATION_MESSAGE_PATH": str(pod / "termination-log"), "TMPDIR": str(pod),
               "PET_NNODES": str(nodes), "PET_NODE_RANK": str(node), "PET_RDZV_BACKEND": "c10d",
               "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": request.run_id,
               # Pod 0 holds the rendezvous: in a cluster because the endpoint is its DNS name, here by being told.
               "PET_RDZV_CONF": f"is_host={int(node == 0)}"}
        pods.append(subprocess.Popen([sys.executable, "-m", "tweetbot_trainer.cli", "train"], env=env,
                                     stdout=open(pod / "train.log", "wb"), stderr=subprocess.STDOUT))
    return pods


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_pod(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and its ranks at once, as when a spot node disappears (the ranks run in sessions
    of their own, so the launcher's process group does not reach them)."""
    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()


def finished(process: subprocess.Popen, directory: Path) -> StageResult:
    assert process.wait(timeout=600) == 0, (directory / "train.log").read_text()[-6000:]
    return StageResult.from_termination_message((directory / "termination-log").read_text())


def final_weights(s3, bucket: str, request: StageRequest) -> dict[str, torch.Tensor]:
    body = s3.get_object(Bucket=bucket, Key=request.s3.final_model + "model.safetensors")["Body"].read()
    return load_safetensors(body)


def test_two_ranks_killed_after_a_checkpoint_resume_to_the_uninterrupted_result(world, tmp_path):
    dev_env, s3, bucket = world
    whole, killed = (two_rank_request(bucket, dev_env.s3_endpoint, run_id) for run_id in ("whole", "killed"))
    for request in (whole, killed):
        put_dataset(s3, bucket, request.s3, 300)

    process = start_ranks(dev_env, killed, tmp_path / "first")
    try:
        wait_for(lambda: checkpoint_steps(s3, bucket, killed.s3) or process.poll() is not None,
                 timeout=300, interval=0.1, what="a checkpoint in S3")
    finally:
        kill_pod(process)
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    resumed_from = max(checkpoint_steps(s3, bucket, killed.s3))
    assert resumed_from < STEPS
    prefix = f"{killed.s3.checkpoints}checkpoint-{resumed_from}/"
    files = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())["files"]
    for rank in range(RANKS):
        assert any(name.endswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") for name in files), sorted(files)
        assert f"rng_state_{rank}.pth" in files, sorted(files)

    resumed = finished(start_ranks(dev_env, killed, tmp_path / "second"), tmp_path / "second")
    # The uninterrupted run, started only now: two pods of two ranks would be four processes on this machine.
    reference = finished(start_ranks(dev_env, whole, tmp_path / "whole"), tmp_path / "whole")
    assert f"resuming from checkpoint {resumed_from}" in (tmp_path / "second" / "train.log").read_text()
    assert resumed.metrics["steps"] == reference.metrics["steps"] == STEPS
    # The model after the last step follows from every rank's optimizer state, learning rate and random state.
    expected, got = final_weights(s3, bucket, whole), final_weights(s3, bucket, killed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_failed_rank_s_exit_code_and_message_are_the_pod_s(world, tmp_path):
    """torchrun alone would exit 1 and leave the message to whichever rank wrote last."""
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "too-small", blockSize=128)
    put_dataset(s3, bucket, request.s3, 3)
    process = start_ranks(dev_env, request, tmp_path / "run")
    assert process.wait(timeout=300) == 19, (tmp_path / "run" / "train.log").read_text()[-6000:]
    error = StageResult.from_termination_message((tmp_path / "run" / "termination-log").read_text()).error
    assert error.startswith("DatasetTooSmall: the dataset's 3 training posts")


def test_the_pod_reports_rank_0_unless_it_was_stopped_before_it_could(tmp_path):
    def written(**messages) -> Path:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        for rank, message in messages.items():
            (directory / rank.lstrip("r")).write_text(message)
        return directory

    assert pod_outcome(written(r0="done", r1="done too"), {}) == ("done", 0)
    assert pod_outcome(written(r0="DatasetTooSmall", r1="DatasetTooSmall"), {1: 19, 0: 19}) == ("DatasetTooSmall", 19)
    # Rank 1 ran out of memory first; the launcher stopped rank 0 (SIGTERM) before it wrote anything.
    assert pod_outcome(written(r1="OutOfMemory"), {1: 21, 0: -15}) == ("OutOfMemory", 21)
    # Both failed alike; rank 0 wrote its message and was stopped before it could exit with its code (seen in CI).
    assert pod_outcome(written(r0="DatasetTooSmall", r1="DatasetTooSmall"), {1: 19, 0: -15}) == ("DatasetTooSmall", 19)
    assert pod_outcome(written(), {0: -9, 1: -9}) == (None, 137)


def test_gpus_that_cuda_cannot_see_fail_before_anything_loads(monkeypatch):
    from tweetbot_trainer import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(train, "load_posts", lambda *args: pytest.fail("the dataset was read"))
    request = StageRequest(**{**request_for("b", "", "gpu-less").__dict__, "gpus": 2})
    with pytest.raises(NoUsableGPU) as failed:
        train.run_train(request, storage=None)
    assert failed.value.exit_code == 24
    assert failed.value.message.startswith("spec.resources.gpus is 2 but CUDA sees 1 GPU(s) in the pod: check the node's "
                                           "NVIDIA driver")
    assert "NVIDIA device plugin" in failed.value.message and "nvidia.com/gpu" in failed.value.message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver too old for the CUDA of the image
    with pytest.raises(NoUsableGPU, match="CUDA sees 0 GPU"):
        train.require_gpus(1)
    train.require_gpus(0)


ZERO3_LOAD = """
import json, os, sys
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from tweetbot_trainer import train
from tweetbot_trainer.contract import StageRequest

load = train.load_model_and_tokenizer

def loaded_as_zero3(source, revision):
    zero3 = is_deepspeed_zero3_enabled()
    model, _ = load(source, revision)
    partitioned = all(hasattr(parameter, "ds_id") for parameter in model.parameters())
    print(json.dumps({"zero3": zero3, "partitioned": partitioned}), flush=True)
    os._exit(0)

train.load_posts = lambda storage, layout: []
train.load_model_and_tokenizer = loaded_as_zero3
train.run_train(StageRequest.from_json(sys.argv[1]), storage=None)
"""


def test_with_zero3_each_rank_loads_the_model_partitioned(tmp_path):
    from test_train_stage import posts

    model = build_tiny_gpt2(tmp_path / "tiny", posts(50))
    request = request_for("b", "", "zero3", deepspeed={"zeroStage": 3})
    request = StageRequest(**{**request.__dict__, "model": {"name": str(model), "revision": "main"}})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", ZERO3_LOAD, request.to_json()], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"zero3": True, "partitioned": True}


def test_two_pods_of_one_rank_train_as_one_pod_of_two_ranks(world, tmp_path):
    """The same global batch on two nodes as on one: the same model, whichever launched the ranks."""
    dev_env, s3, bucket = world
    one, two = (two_rank_request(bucket, dev_env.s3_endpoint, run_id) for run_id in ("one-pod", "two-pods"))
    for request in (one, two):
        put_dataset(s3, bucket, request.s3, 300)
    pods = start_pods(dev_env, two, tmp_path / "two", free_port())
    results = [finished(pod, tmp_path / "two" / f"pod-{node}") if node == 0 else pod.wait(timeout=600)
               for node, pod in enumerate(pods)]
    assert results[1] == 0, (tmp_path / "two" / "pod-1" / "train.log").read_text()[-6000:]
    assert not (tmp_path / "two" / "pod-1" / "termination-log").exists()  # the first pod's result is the stage's
    reference = finished(start_ranks(dev_env, one, tmp_path / "one"), tmp_path / "one")
    assert results[0].metrics["steps"] == reference.metrics["steps"] == STEPS
    # Every pod's shards are in the checkpoint's one manifest.
    newest = max(checkpoint_steps(s3, bucket, two.s3))
    files = json.loads(s3.get_object(Bucket=bucket, Key=f"{two.s3.checkpoints}checkpoint-{newest}/manifest.json")["Body"].read())["files"]
    for rank in range(RANKS):
        assert f"rng_state_{rank}.pth" in files, sorted(files)
        assert any(name.endswith(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") for name in files), sorted(files)
    expected, got = final_weights(s3, bucket, one), final_weights(s3, bucket, two)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)



def test_a_gang_started_again_after_a_pod_failed_resumes_every_pod_to_the_uninterrupted_result(world, tmp_path):
    """What the operator does when a pod of two fails: the Job fails (podFailurePolicy) and goes with its pods, and
    a new Job's two pods resume from the newest checkpoint both completed."""
    dev_env, s3, bucket = world
    whole, killed = (two_rank_request(bucket, dev_env.s3_endpoint, run_id) for run_id in ("gang-whole", "gang-killed"))
    for request in (whole, killed):
        put_dataset(s3, bucket, request.s3, 300)
    pods = start_pods(dev_env, killed, tmp_path / "first", free_port())
    try:
        wait_for(lambda: checkpoint_steps(s3, bucket, killed.s3) or any(pod.poll() is not None for pod in pods),
                 timeout=300, interval=0.1, what="a checkpoint in S3")
    finally:
        for pod in pods:
            kill_pod(pod)
    resumed_from = max(checkpoint_steps(s3, bucket, killed.s3))
    assert resumed_from < STEPS, "training finished before it could be killed"
    first, second = start_pods(dev_env, killed, tmp_path / "again", free_port())
    result = finished(first, tmp_path / "again" / "pod-0")
    assert second.wait(timeout=600) == 0
    for pod in ("pod-0", "pod-1"):
        assert f"resuming from checkpoint {resumed_from}" in (tmp_path / "again" / pod / "train.log").read_text()
    reference = finished(start_ranks(dev_env, whole, tmp_path / "whole"), tmp_path / "whole")
    assert result.metrics["steps"] == reference.metrics["steps"] == STEPS
    expected, got = final_weights(s3, bucket, whole), final_weights(s3, bucket, killed)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
