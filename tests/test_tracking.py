"""Experiment tracking (spec.training.reportTo): one training of a tiny GPT-2 reporting to TensorBoard, W&B (offline)
and MLflow (a local file store) at once, each read back with the tracker's own reader or files; a tracker that
cannot be reached fails the stage before the model loads, without its key in any message."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_train_stage import bucket_with_tiny_gpt2, put_dataset, request_for, start_train
from tweetbot_trainer.contract import StageResult
from tweetbot_trainer.tracking import Trackers, Tracking, tracker_environment, wandb_run_id

pytestmark = pytest.mark.s3

RUN_NAME = "bots/dreamer/run-t"
TOTAL_STEPS = 2 * -(-54 // 8)  # 2 epochs of 54 blocks, batch 8; one log per step (logging_steps 1)
TRACKED = {"wandb": {"project": "tweetbot-tests", "entity": "dreamers"},
           "mlflow": {"trackingUri": "https://mlflow.example/", "experiment": "tweetbot-tests"}}

KEYS = {"WANDB_API_KEY": "wandb-key-0123456789abcdef", "MLFLOW_TRACKING_TOKEN": "mlflow-token-0123456789abcdef"}


@pytest.fixture(scope="module")
def world(dev_env, new_bucket, tmp_path_factory):
    return (dev_env, *bucket_with_tiny_gpt2(new_bucket, tmp_path_factory, "tracking"))


@pytest.fixture(scope="module")
def tracked(world, tmp_path_factory):
    """The train stage reporting to all three trackers; W&B offline, MLflow to a file store (mlflow-skinny writes
    one only when MLFLOW_ALLOW_FILE_STORE is set): both set by the environment, as by hand, which wins over the spec."""
    dev_env, s3, bucket = world
    tmp = tmp_path_factory.mktemp("tracked")
    request = request_for(bucket, dev_env.s3_endpoint, "run-t", epochs=2, reportTo=["tensorboard", "wandb", "mlflow"],
                          checkpoint={"everySteps": 5, "everyMinutes": 60, "keep": 2}, **TRACKED)
    put_dataset(s3, bucket, request.s3, 300)
    process = start_train(dev_env, request, tmp, WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb"),
                          MLFLOW_TRACKING_URI=(tmp / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true", **KEYS)
    assert process.wait(timeout=600) == 0, (tmp / "train.log").read_text()[-5000:]
    result = StageResult.from_termination_message((tmp / "termination-log").read_text())
    assert result.ok and result.metrics["steps"] == TOTAL_STEPS
    return SimpleNamespace(dev_env=dev_env, s3=s3, bucket=bucket, request=request, tmp=tmp)


READ_EVENTS = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
events.Reload()
tags = events.Tags()
print(json.dumps({
    "scalars": {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in tags["scalars"]},
    "texts": {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)] for tag in tags["tensors"]},
}))
"""


def test_tensorboard_reads_loss_per_step_and_the_samples_from_s3(tracked):
    keys = [item["Key"] for item in tracked.s3.list_objects_v2(Bucket=tracked.bucket, Prefix=tracked.request.s3.tensorboard)["Contents"]]
    assert keys and all("events.out.tfevents" in key for key in keys)
    # TensorBoard's own reader, straight from S3 as `tensorboard --logdir s3://...` reads it: without TensorFlow its
    # stub filesystem takes the endpoint from S3_ENDPOINT and the credentials as boto3 does.
    env = {**os.environ, "S3_ENDPOINT": tracked.dev_env.s3_endpoint, "AWS_ACCESS_KEY_ID": tracked.dev_env.s3_access_key,
           "AWS_SECRET_ACCESS_KEY": tracked.dev_env.s3_secret_key, "AWS_REGION": "us-east-1"}
    logdir = f"s3://{tracked.bucket}/{tracked.request.s3.tensorboard.rstrip('/')}"
    read = subprocess.run([sys.executable, "-c", READ_EVENTS, logdir], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    events = json.loads(read.stdout)
    loss = events["scalars"]["train/loss"]
    assert [step for step, _ in loss] == list(range(1, TOTAL_STEPS + 1))
    assert all(0 < value < 10 for _, value in loss) and loss[-1][1] < loss[0][1]
    assert [step for step, _ in events["scalars"]["eval/loss"]] == [7, 14]  # one evaluation per epoch
    samples = events["texts"]["samples/text_summary"][0]
    written = json.loads(tracked.s3.get_object(Bucket=tracked.bucket, Key=tracked.request.s3.final_model + "samples.json")["Body"].read())
    assert all(sample.split()[0] in samples for sample in written) and samples.count("My dream is") == 3


def wandb_records(path: Path):
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of checksum, length, type, data) after
    W&B's 7-byte header, each record one wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, offset, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_writes_its_offline_run_with_losses_and_the_samples_table(tracked):
    runs = list((tracked.tmp / "wandb" / "wandb").glob(f"offline-run-*-{wandb_run_id(RUN_NAME)}"))
    assert len(runs) == 1
    records = list(wandb_records(runs[0] / f"run-{wandb_run_id(RUN_NAME)}.wandb"))
    run = next(record.run for record in records if record.WhichOneof("record_type") == "run")
    assert run.display_name == RUN_NAME and run.project == "tweetbot-tests" and run.entity == "dreamers"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
               for record in records if record.WhichOneof("record_type") == "history"]
    assert [row["train/global_step"] for row in history if "train/loss" in row] == list(range(1, TOTAL_STEPS + 1))
    # W&B flattens a logged table's description into nested keys: samples/_type, samples/path, ...
    [table] = [{key.split("/", 1)[1]: value for key, value in row.items() if key.startswith("samples/")}
               for row in history if "samples/_type" in row]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    rows = json.loads((runs[0] / "files" / table["path"]).read_text())
    assert rows["columns"] == ["prompt", "generation"] and all(generation.startswith("My dream is") for _, generation in rows["data"])


def test_mlflow_holds_loss_per_step_the_samples_and_no_artifacts(tracked):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(tracked.tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tweetbot-tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == RUN_NAME and run.info.status == "FINISHED"
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, TOTAL_STEPS + 1))
    assert all(run.data.tags[f"samples.{index}"].startswith("My dream is") for index in range(3))
    assert client.list_artifacts(run.info.run_id) == []


def test_run_pages_reach_training_json_only_for_http_trackers(tracked):
    training = json.loads(tracked.s3.get_object(Bucket=tracked.bucket, Key=tracked.request.s3.final_model + "training.json")["Body"].read())
    assert "tracking" not in training  # W&B offline has no page; a file: store none either

    trackers = Trackers(Tracking(("mlflow",), RUN_NAME, mlflow={"experiment": "x"}), tracked.tmp)
    trackers.mlflow_run = SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_id="9f1e"))
    os.environ["MLFLOW_TRACKING_URI"] = "https://mlflow.example/"
    try:
        assert trackers.finish() == {"mlflow": "https://mlflow.example/#/experiments/3/runs/9f1e"}
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_the_environment_follows_the_spec_and_never_asks_for_mlflow_artifacts(tmp_path):
    tracking = Tracking(("tensorboard", "wandb", "mlflow"), RUN_NAME,
                        wandb={**TRACKED["wandb"], "host": "https://wandb.example"}, mlflow=TRACKED["mlflow"])
    env = tracker_environment(tracking, tmp_path, {})
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
    assert (env["WANDB_PROJECT"], env["WANDB_ENTITY"], env["WANDB_BASE_URL"]) == ("tweetbot-tests", "dreamers", "https://wandb.example")
    assert all(env[name].startswith(str(tmp_path)) for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"))
    assert (env["MLFLOW_TRACKING_URI"], env["MLFLOW_EXPERIMENT_NAME"]) == ("https://mlflow.example/", "tweetbot-tests")
    assert env["HF_MLFLOW_LOG_ARTIFACTS"] == "FALSE" and env["WANDB_LOG_MODEL"] == "false"
    only_tensorboard = tracker_environment(Tracking(("tensorboard",), RUN_NAME, **TRACKED), tmp_path, {})
    assert list(only_tensorboard) == ["TENSORBOARD_LOGGING_DIR"]
    assert tracker_environment(tracking, tmp_path, {"MLFLOW_TRACKING_URI": "file:///tmp/x"})["MLFLOW_TRACKING_URI"] == "file:///tmp/x"


@pytest.mark.parametrize("tracker, env, message", [
    ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9/", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
     "TrackerUnavailable: cannot start the MLflow run in experiment 'tweetbot-tests' at http://127.0.0.1:9/ "),
    ("wandb", {"WANDB_MODE": "online", "WANDB_API_KEY": ""},
     "TrackerUnavailable: no W&B API key: WANDB_API_KEY is empty (check spec.training.wandb.apiKeySecretRef)"),
    # W&B waits WANDB_INIT_TIMEOUT (90 s unless set) for its server.
    ("wandb", {"WANDB_MODE": "online", "WANDB_INIT_TIMEOUT": "5"},
     "TrackerUnavailable: cannot start the W&B run in project 'tweetbot-tests' at http://127.0.0.1:9 (CommError): "
     "check spec.training.wandb and the API key its apiKeySecretRef names"),
], ids=["mlflow-unreachable", "wandb-without-key", "wandb-unreachable"])
def test_a_tracker_that_cannot_start_fails_the_stage_before_the_model_loads(world, tmp_path, tracker, env, message):
    dev_env, s3, bucket = world
    tracked = {**TRACKED, "wandb": {**TRACKED["wandb"], "host": "http://127.0.0.1:9"}}
    request = request_for(bucket, dev_env.s3_endpoint, f"run-{tracker}", reportTo=[tracker], **tracked)
    put_dataset(s3, bucket, request.s3, 50)
    token = "5eC7" + "0123456789abcdef" * 2 + "5eC7"  # a W&B key is 40 characters; a malformed one fails earlier
    process = start_train(dev_env, request, tmp_path, **{"MLFLOW_TRACKING_TOKEN": token, "WANDB_API_KEY": token, **env})
    assert process.wait(timeout=300) == 25, (tmp_path / "train.log").read_text()[-5000:]
    error = StageResult.from_termination_message((tmp_path / "termination-log").read_text()).error
    assert error.startswith(message)
    log = (tmp_path / "train.log").read_text()
    assert "train blocks" not in log  # failed before the data and the model
    assert token not in error and token not in log


def test_no_tracker_keeps_a_key_or_the_s3_credentials(tracked):
    """The trackers record the environment they run in (W&B its system facts, all three the TrainingArguments):
    none of the pod's secrets is among what they keep or send."""
    secrets = [*KEYS.values(), tracked.dev_env.s3_access_key, tracked.dev_env.s3_secret_key]
    kept = [path for path in (tracked.tmp / "wandb").rglob("*") if path.is_file()]
    kept += [path for path in (tracked.tmp / "mlruns").rglob("*") if path.is_file()]
    assert len(kept) > 10
    for path in kept:
        data = path.read_bytes()
        assert not [secret for secret in secrets if secret.encode() in data], path
    for item in tracked.s3.list_objects_v2(Bucket=tracked.bucket, Prefix=tracked.request.s3.tensorboard)["Contents"]:
        data = tracked.s3.get_object(Bucket=tracked.bucket, Key=item["Key"])["Body"].read()
        assert not [secret for secret in secrets if secret.encode() in data], item["Key"]
