"""`tweetbot-trainer train` with DeepSpeed on CPU: a tiny GPT-2 from the real S3 server, trained, checkpointed,
resumed, saved and reloaded with pipeline()."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import boto3
import pytest

from tweetbot_dev.polling import wait_for
from tweetbot_dev.tiny_model import build_tiny_gpt2
from tweetbot_trainer.contract import S3Layout, StageRequest, StageResult

pytestmark = pytest.mark.s3

WORDS = ("my dream is to sail across the quiet sea with a small boat and a cat who likes fish "
         "every morning the sun rises over the water and the birds sing their songs").split()


def posts(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(8 + i % 9)) for i in range(count)]


def bucket_with_tiny_gpt2(new_bucket, tmp_path_factory, prefix: str):
    """(S3 client, a new bucket with a tiny GPT-2 under base/tiny-gpt2/)."""
    s3, bucket = new_bucket(prefix)
    model_dir = build_tiny_gpt2(tmp_path_factory.mktemp("tiny"), posts(400))
    for path in model_dir.iterdir():
        s3.upload_file(str(path), bucket, f"base/tiny-gpt2/{path.name}")
    return s3, bucket


@pytest.fixture(scope="module")
def world(dev_env, new_bucket, tmp_path_factory):
    return (dev_env, *bucket_with_tiny_gpt2(new_bucket, tmp_path_factory, "train"))


def request_for(bucket, endpoint, run_id, **training) -> StageRequest:
    return StageRequest(
        stage="train", run_id=run_id, namespace="bots", bot="dreamer", handles=["dreamer"],
        s3=S3Layout(bucket=bucket, prefix="tweetbot", namespace="bots", bot="dreamer", run_id=run_id, endpoint=endpoint),
        model={"name": f"s3://{bucket}/base/tiny-gpt2/", "revision": "main"},
        data={"validationFraction": 0.1},
        training={"epochs": 3, "learningRate": 3e-3, "batchSize": 8, "blockSize": 64, "seed": 1,
                  "deepspeed": {"zeroStage": 2}, **training},
    )


def put_dataset(s3, bucket, layout: S3Layout, count: int):
    body = "".join(json.dumps({"handle": "dreamer", "id": str(i), "text": text}) + "\n" for i, text in enumerate(posts(count)))
    s3.put_object(Bucket=bucket, Key=layout.dataset, Body=body.encode())
    s3.put_object(Bucket=bucket, Key=layout.key("data", "manifest.json"), Body=b"{}")


def start_train(dev_env, request: StageRequest, tmp_path: Path, **env_overrides) -> subprocess.Popen:
    env = {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2",
           "AWS_ACCESS_KEY_ID": dev_env.s3_access_key, "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key,
           "TWEETBOT_TERMINATION_MESSAGE_PATH": str(tmp_path / "termination-log"), **env_overrides}
    return subprocess.Popen([sys.executable, "-m", "tweetbot_trainer.cli", "train"], env=env,
                            stdout=open(tmp_path / "train.log", "wb"), stderr=subprocess.STDOUT)


def test_train_with_zero2_saves_a_model_that_generates(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-a")
    put_dataset(s3, bucket, request.s3, 300)
    process = start_train(dev_env, request, tmp_path)
    assert process.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    result = StageResult.from_termination_message((tmp_path / "termination-log").read_text())
    assert result.ok and result.metrics["steps"] > 0
    assert result.metrics["evalLoss"] < 4.5  # the random init scores about ln(357 tokens) = 5.9
    assert result.artifacts["modelUri"] == f"s3://{bucket}/tweetbot/bots/dreamer/run-a/final/"

    final = tmp_path / "final"
    prefix = request.s3.final_model
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert "model.safetensors" in manifest["files"] and "generation_config.json" in manifest["files"]
    for name in manifest["files"]:
        final.joinpath(name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + name, str(final / name))
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["prefix"] == "<|endoftext|>" and generation["top_p"] == 0.95 and generation["max_length"] == 160

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(final), device="cpu")
    text = generator("My dream is", max_new_tokens=60)[0]["generated_text"]
    assert text.startswith("My dream is") and len(text) > len("My dream is")
    assert len(json.loads((final / "samples.json").read_text())) == 3


def kill_after_a_checkpoint(dev_env, s3, bucket, request: StageRequest, directory: Path, at_least: int = 0) -> int:
    """Start the stage, SIGKILL it once S3 holds a checkpoint of step `at_least` or later (a spot GPU disappearing:
    no chance to clean up); the newest checkpoint's step."""
    directory.mkdir()
    process = start_train(dev_env, request, directory)
    try:
        wait_for(lambda: any(step >= at_least for step in checkpoint_steps(s3, bucket, request.s3)) or process.poll() is not None,
                 timeout=300, interval=0.1, what="a checkpoint in S3")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    return max(checkpoint_steps(s3, bucket, request.s3))


def checkpoint_steps(s3, bucket, layout: S3Layout) -> list[int]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=layout.checkpoints).get("Contents", [])
    return sorted(int(item["Key"].split("/checkpoint-")[1].split("/")[0]) for item in listed if item["Key"].endswith("/manifest.json"))


@pytest.mark.parametrize("deepspeed, optimizer_state", [
    ({"zeroStage": 2}, "optim_states"),  # DeepSpeed's ZeRO optimizer state
    ({}, "optimizer.pt"),  # one CPU process with the defaults: the plain Trainer's
], ids=["zero2", "plain"])
def test_a_killed_training_resumes_from_its_last_checkpoint(world, tmp_path, deepspeed, optimizer_state):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, f"run-b{len(deepspeed)}", epochs=40, learningRate=1e-3,
                          checkpoint={"everySteps": 20, "everyMinutes": 60, "keep": 2}, deepspeed=deepspeed)
    put_dataset(s3, bucket, request.s3, 300)
    resumed_from = kill_after_a_checkpoint(dev_env, s3, bucket, request, tmp_path / "first", at_least=40)
    files = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"{request.s3.checkpoints}checkpoint-{resumed_from}/")["Contents"]]
    assert any(optimizer_state in key for key in files), f"the checkpoint holds the optimizer state ({optimizer_state})"

    second = tmp_path / "second"
    second.mkdir()
    process = start_train(dev_env, request, second)
    assert process.wait(timeout=600) == 0, (second / "train.log").read_text()[-5000:]
    log = (second / "train.log").read_text()
    assert f"resuming from checkpoint {resumed_from}" in log
    result = StageResult.from_termination_message((second / "termination-log").read_text())
    total_steps = 40 * -(-54 // 8)  # epochs x steps per epoch (54 blocks, batch 8)
    assert result.metrics["steps"] == total_steps
    # The scheduler came back too: the first learning rate logged after the restart is already decayed.
    first_lr = float(log.split("'learning_rate': '")[1].split("'")[0])
    cosine_at_resume = 0.5e-3 * (1 + math.cos(math.pi * resumed_from / total_steps))
    assert first_lr <= cosine_at_resume + 1e-7 < 1e-3 * 0.99
    # The optimizer and model came back: the first loss after the restart is far below the untrained ~5.9.
    assert float(log.split("{'loss': '")[1].split("'")[0]) < 4.0
    assert len(checkpoint_steps(s3, bucket, request.s3)) <= 2  # keep: 2


def test_zero3_still_writes_a_loadable_safetensors_model(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-c", epochs=1, deepspeed={"zeroStage": 3})
    put_dataset(s3, bucket, request.s3, 120)
    process = start_train(dev_env, request, tmp_path)
    assert process.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    head = s3.head_object(Bucket=bucket, Key=request.s3.final_model + "model.safetensors")
    assert head["ContentLength"] > 100_000  # the gathered 16-bit weights, not an empty ZeRO-3 shell


def test_a_dataset_too_small_for_one_block_fails_clearly(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-d", blockSize=128)
    put_dataset(s3, bucket, request.s3, 3)
    process = start_train(dev_env, request, tmp_path)
    assert process.wait(timeout=300) == 19
    result = StageResult.from_termination_message((tmp_path / "termination-log").read_text())
    assert result.error.startswith("DatasetTooSmall: the dataset's 3 training posts make less than one block of 128 tokens")


def test_packing_and_the_validation_split():
    from tweetbot_trainer.train import pack, split_posts

    assert pack(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack(list(range(3)), 4) == []
    train, held_out = split_posts([str(i) for i in range(100)], 0.1, seed=3)
    assert len(held_out) == 10 and not set(train) & set(held_out)
    assert split_posts([str(i) for i in range(100)], 0.1, seed=3) == (train, held_out)


def test_a_base_model_that_cannot_be_loaded_fails_clearly(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-e")
    request = StageRequest(**{**request.__dict__, "model": {"name": str(tmp_path / "no-such-model"), "revision": "main"}})
    put_dataset(s3, bucket, request.s3, 50)
    process = start_train(dev_env, request, tmp_path)
    assert process.wait(timeout=300) == 20
    error = StageResult.from_termination_message((tmp_path / "termination-log").read_text()).error
    assert error.startswith(f"BaseModelUnavailable: cannot load the base model '{tmp_path / 'no-such-model'}'")


def test_a_scheduled_run_starts_from_the_earlier_runs_final_model(world, tmp_path):
    dev_env, s3, bucket = world
    request = replace(request_for(bucket, dev_env.s3_endpoint, "run-next", epochs=1), starts_from_run="run-earlier")
    # The earlier run's model has one layer where the spec's base model has two: the one loaded shows.
    earlier = request.s3.of_run("run-earlier").final_model
    model_dir = build_tiny_gpt2(tmp_path / "earlier", posts(400), n_layer=1, seed=7)
    for path in model_dir.iterdir():
        s3.upload_file(str(path), bucket, earlier + path.name)
    put_dataset(s3, bucket, request.s3, 100)

    missing = replace(request, starts_from_run="run-unfinished")
    process = start_train(dev_env, missing, tmp_path)
    assert process.wait(timeout=300) == 18, (tmp_path / "train.log").read_text()[-5000:]
    error = StageResult.from_termination_message((tmp_path / "termination-log").read_text()).error
    assert error.startswith("MissingInput: no complete final model of the run run-unfinished at "
                            f"s3://{bucket}/tweetbot/bots/dreamer/run-unfinished/final/")

    process = start_train(dev_env, request, tmp_path)  # the earlier model has no manifest yet: not complete
    assert process.wait(timeout=300) == 18, (tmp_path / "train.log").read_text()[-5000:]
    s3.put_object(Bucket=bucket, Key=earlier + "manifest.json", Body=json.dumps({"files": {}}).encode())
    process = start_train(dev_env, request, tmp_path)
    assert process.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-5000:]
    final = request.s3.final_model
    config = json.loads(s3.get_object(Bucket=bucket, Key=final + "config.json")["Body"].read())
    assert config["n_layer"] == 1
    facts = json.loads(s3.get_object(Bucket=bucket, Key=final + "training.json")["Body"].read())
    assert facts["baseModel"] == f"s3://{bucket}/base/tiny-gpt2/"  # the spec's: the card names what the bot grew from


def test_one_cpu_process_starts_deepspeed_without_a_compiler(tmp_path):
    """The stage image has no C++ compiler: one CPU process must not make DeepSpeed build its shared-memory op."""
    code = ("from tweetbot_trainer.train import skip_shared_memory_comm\n"
            "skip_shared_memory_comm(cuda=False)\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "assert build_shm_op() is None\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "PATH": str(Path(sys.executable).parent)}  # no g++, as in the image
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing was compiled


def local_checkpoints(tmp: Path) -> dict[int, int]:
    """Step -> bytes of the checkpoints the stage holds under its TMPDIR (its workdir is a mkdtemp there)."""
    found = {}
    try:
        directories = list(tmp.glob("tweetbot-train-*/checkpoints/checkpoint-*"))
    except FileNotFoundError:
        return found  # the stage removed its workdir while we looked: the next look sees what is left
    for directory in directories:
        try:
            found[int(directory.name.split("-")[-1])] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        except (FileNotFoundError, ValueError):
            pass  # deleted while we looked
    return found


def test_local_checkpoints_go_once_uploaded_and_stay_within_keep(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-f", epochs=2,
                          checkpoint={"everySteps": 1, "everyMinutes": 60, "keep": 2})
    put_dataset(s3, bucket, request.s3, 300)
    (tmp_path / "tmp").mkdir()
    process = start_train(dev_env, request, tmp_path, TMPDIR=str(tmp_path / "tmp"))
    most, most_bytes, seen = 0, 0, set()
    while process.poll() is None:
        local = local_checkpoints(tmp_path / "tmp")
        most, most_bytes, seen = max(most, len(local)), max(most_bytes, sum(local.values())), seen | set(local)
        time.sleep(0.02)
    assert process.returncode == 0, (tmp_path / "train.log").read_text()[-5000:]
    total_steps = 2 * -(-54 // 8)
    assert len(seen) > total_steps // 2, "the checkpoints were saved and seen on disk"
    assert most <= 2, f"{most} checkpoints ({most_bytes} bytes) on local disk at once, keep is 2"
    assert checkpoint_steps(s3, bucket, request.s3) == [total_steps - 1, total_steps]


def credentials_without_checkpoint_writes(dev_env, bucket: str, layout: S3Layout) -> dict:
    """Temporary credentials (MinIO's STS) that may do anything in the bucket but write checkpoints."""
    sts = boto3.client("sts", endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                       aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": [f"arn:aws:s3:::{bucket}/{layout.checkpoints}*"]},
    ]}
    credentials = sts.assume_role(RoleArn="arn:minio:iam:::role/no-checkpoints", RoleSessionName="no-checkpoints",
                                  Policy=json.dumps(policy), DurationSeconds=900)["Credentials"]
    return {"AWS_ACCESS_KEY_ID": credentials["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
            "AWS_SESSION_TOKEN": credentials["SessionToken"]}


def test_a_refused_checkpoint_upload_stops_training_at_the_next_step(world, tmp_path):
    dev_env, s3, bucket = world
    request = request_for(bucket, dev_env.s3_endpoint, "run-g", epochs=10,
                          checkpoint={"everySteps": 1, "everyMinutes": 60, "keep": 2})
    put_dataset(s3, bucket, request.s3, 300)
    credentials = credentials_without_checkpoint_writes(dev_env, bucket, request.s3)
    (tmp_path / "tmp").mkdir()
    process = start_train(dev_env, request, tmp_path, TMPDIR=str(tmp_path / "tmp"), **credentials)
    assert process.wait(timeout=600) == 23, (tmp_path / "train.log").read_text()[-5000:]
    error = StageResult.from_termination_message((tmp_path / "termination-log").read_text()).error
    assert error.startswith(f"CheckpointUploadFailed: saving checkpoint 1 to S3: upload to s3://{bucket}/{request.s3.checkpoints}checkpoint-1/")
    assert error.endswith(" failed: AccessDenied")
    assert "?" not in error and not any(secret in error for secret in credentials.values())
    # Stopped at the next step or two, of 70; the checkpoint that is not in S3 is still on disk.
    local = local_checkpoints(tmp_path / "tmp")
    assert 1 in local and max(local) <= 3, sorted(local)
    assert checkpoint_steps(s3, bucket, request.s3) == []


def test_samples_from_the_trained_model_in_memory_are_those_of_the_saved_one(tmp_path):
    """The card's samples come from the model still in memory (no second load; on its GPU where it trained):
    they must be what the saved files give with the same seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tweetbot_trainer.train import sample_generations, save_for_generation

    source = build_tiny_gpt2(tmp_path / "tiny", posts(50))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    model.train()  # as the Trainer leaves it: sampling must not keep dropout on
    final = tmp_path / "final"
    model.save_pretrained(final)
    save_for_generation(final, tokenizer)
    saved = sample_generations(final, seed=7)
    assert sample_generations(final, seed=7, trained=model) == saved
    assert len(set(saved)) > 1
