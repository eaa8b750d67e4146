"""`tweetbot-trainer publish`: the final model and its card, to S3 and (when asked) to a Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tweetbot_dev.tiny_model import build_tiny_gpt2
from tweetbot_trainer.card import inline, parse_table
from tweetbot_trainer.contract import S3Layout, StageRequest, StageResult

pytestmark = pytest.mark.s3

STATS = {"network": "X", "collectedAt": "2026-11-22T10:00:00Z", "handles": [
    {"handle": "purefulsoul", "displayName": "Pureful | Soul 🍂", "downloaded": 256, "retweets": 4, "short": 42, "kept": 210},
    {"handle": "turtlebreezee", "displayName": "🐢", "downloaded": 3229, "retweets": 20, "short": 304, "kept": 2905}]}


@pytest.fixture(scope="module")
def trained(dev_env, new_bucket, tmp_path_factory):
    """A run whose scrape and train stages are done: stats and a final model in the real S3."""
    s3, bucket = new_bucket("publish")
    layout = S3Layout(bucket=bucket, prefix="tweetbot", namespace="bots", bot="cyborg", run_id="run1", endpoint=dev_env.s3_endpoint)
    model = build_tiny_gpt2(tmp_path_factory.mktemp("model"), ["my dream is to fly over the sea"] * 20)
    (model / "training.json").write_text(json.dumps({"baseModel": "gpt2", "metrics": {"evalLoss": 3.1, "perplexity": 22.2},
                                                     "hyperparameters": {"epochs": 4}, "deepspeed": "ZeRO stage 2"}))
    (model / "samples.json").write_text(json.dumps(["My dream is <b>bold</b> | free"]))
    files = {}
    for path in model.iterdir():
        s3.upload_file(str(path), bucket, layout.final_model + path.name)
        files[path.name] = {"bytes": path.stat().st_size}
    s3.put_object(Bucket=bucket, Key=layout.final_model + "manifest.json", Body=json.dumps({"files": files}).encode())
    s3.put_object(Bucket=bucket, Key=layout.stats, Body=json.dumps(STATS).encode())
    return dev_env, s3, layout


def publish(dev_env, layout: S3Layout, tmp_path, hub=None, extra_env=None, handles=("purefulsoul", "turtlebreezee")):
    request = StageRequest(stage="publish", run_id=layout.run_id, namespace="bots", bot="cyborg",
                           handles=list(handles), s3=layout, hub=hub, model={"name": "gpt2"})
    env = {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "AWS_ACCESS_KEY_ID": dev_env.s3_access_key,
           "AWS_SECRET_ACCESS_KEY": dev_env.s3_secret_key, "TWEETBOT_TERMINATION_MESSAGE_PATH": str(tmp_path / "log"),
           **(extra_env or {})}
    finished = subprocess.run([sys.executable, "-m", "tweetbot_trainer.cli", "publish"], env=env,
                              capture_output=True, text=True, timeout=300)
    return finished, StageResult.from_termination_message((tmp_path / "log").read_text())


def test_without_a_hub_the_card_is_written_beside_the_model(trained, tmp_path):
    dev_env, s3, layout = trained
    finished, result = publish(dev_env, layout, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert result.artifacts == {"modelUri": f"s3://{layout.bucket}/tweetbot/bots/cyborg/run1/final/", "hubUrl": "", "hubCommit": ""}
    card = s3.get_object(Bucket=layout.bucket, Key=layout.final_model + "README.md")["Body"].read().decode()
    table = parse_table(card)
    assert table["Pureful | Soul 🍂"] == {"Tweets downloaded": 256, "Retweets": 4, "Short tweets": 42, "Tweets kept": 210}
    assert table["🐢"]["Tweets kept"] == 2905
    assert "- evalLoss: 3.1" in card and "ZeRO stage 2" in card and inline("My dream is <b>bold</b> | free") in card
    # The architecture comes from the model's config.json, the results from training.json.
    assert "[gpt2](https://huggingface.co/gpt2) (GPT2LMHeadModel)" in card
    metrics = yaml.safe_load(card.split("---\n")[1])["model-index"][0]["results"][0]["metrics"]
    assert [(metric["type"], metric["value"]) for metric in metrics] == [("loss", 3.1), ("perplexity", 22.2)]


def test_without_a_trained_model_it_says_so(trained, tmp_path):
    dev_env, s3, layout = trained
    missing = S3Layout(**{**layout.__dict__, "run_id": "never-trained"})
    finished, result = publish(dev_env, missing, tmp_path)
    assert finished.returncode == 18
    assert result.error.startswith("MissingInput: no complete model at s3://")


def test_a_hub_output_without_a_token_fails_before_any_upload(trained, tmp_path):
    dev_env, s3, layout = trained
    finished, result = publish(dev_env, layout, tmp_path, hub={"repoId": "org/bot", "private": False}, extra_env={"HF_TOKEN": ""})
    assert finished.returncode == 12
    assert "HF_TOKEN is empty" in result.error


def test_publishing_to_the_hub_in_one_commit_that_anyone_can_load(trained, tmp_path, hub):
    from huggingface_hub import hf_hub_download
    from transformers import pipeline

    dev_env, s3, layout = trained
    finished, result = publish(dev_env, layout, tmp_path, hub={"private": False, "endpoint": hub.url},
                               extra_env={"HF_TOKEN": "hf_good"})
    assert finished.returncode == 0, finished.stderr
    repo = hub.repos["alice/purefulsoul-turtlebreezee"]  # the token owner's, handles sorted and joined
    assert result.artifacts["hubUrl"] == f"{hub.url}/alice/purefulsoul-turtlebreezee"
    assert result.artifacts["hubCommit"] == repo.head.id
    assert repo.head.message == "TweetBot bots/cyborg: run run1"
    assert {"README.md", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(repo.head.files)
    assert not {"samples.json", "training.json", "manifest.json"} & set(repo.head.files)
    assert "hf_good" not in finished.stdout + finished.stderr

    card = open(hf_hub_download("alice/purefulsoul-turtlebreezee", "README.md", endpoint=hub.url, token=False)).read()
    assert parse_table(card)["Pureful | Soul 🍂"]["Tweets kept"] == 210
    assert "model='alice/purefulsoul-turtlebreezee'" in card
    generator = pipeline("text-generation", model="alice/purefulsoul-turtlebreezee")
    assert generator("My dream is", max_new_tokens=5)[0]["generated_text"].startswith("My dream is")

    # Retraining publishes to the same repository.
    finished, again = publish(dev_env, layout, tmp_path, hub={"private": False, "endpoint": hub.url},
                              extra_env={"HF_TOKEN": "hf_good"})
    assert finished.returncode == 0 and again.artifacts["hubUrl"] == result.artifacts["hubUrl"]


@pytest.mark.parametrize("hub_spec, token, exit_code, message", [
    ({"repoId": "tweetbots/cyborg"}, "hf_wrong", 12, "AuthenticationFailed: the Hub refused the token (401)"),
    ({"repoId": "someoneelse/cyborg"}, "hf_good", 22, "HubForbidden: the token may not create someoneelse/cyborg (403)"),
    ({"repoId": "tweetbots/cyborg", "endpoint": "http://127.0.0.1:9"}, "hf_good", 14,
     "NetworkFailure: the Hub cannot be reached to create tweetbots/cyborg"),
])
def test_hub_failures_say_what_to_fix_and_keep_the_model_in_s3(trained, tmp_path, hub, hub_spec, token, exit_code, message):
    dev_env, s3, layout = trained
    finished, result = publish(dev_env, layout, tmp_path, hub={"endpoint": hub.url, **hub_spec}, extra_env={"HF_TOKEN": token})
    assert finished.returncode == exit_code, finished.stderr
    assert result.error.startswith(message)
    assert token not in result.error + finished.stderr
    assert s3.head_object(Bucket=layout.bucket, Key=layout.final_model + "model.safetensors")


def test_mastodon_handles_publish_to_a_valid_default_repo(trained, tmp_path, hub):
    dev_env, s3, layout = trained
    finished, result = publish(dev_env, layout, tmp_path, hub={"private": False, "endpoint": hub.url},
                               extra_env={"HF_TOKEN": "hf_good"}, handles=["gargron@mastodon.social"])
    assert finished.returncode == 0, finished.stderr
    assert result.artifacts["hubUrl"] == f"{hub.url}/alice/gargron-at-mastodon.social"
    assert "README.md" in hub.repos["alice/gargron-at-mastodon.social"].head.files
