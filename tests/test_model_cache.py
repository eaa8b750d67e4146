"""The base-model cache (the chart's trainer.modelCache): a train pod loads a Hub model it finds in the cache the
operator mounts at contract.MODEL_CACHE_PATH without downloading it again, keyed by Hub endpoint, repository and
commit; a cache it cannot write costs a warning, never the stage."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_train_stage import posts, put_dataset, start_train
from tweetbot_dev.bench_trainer import local_s3
from tweetbot_dev.fake_hub import FakeHub
from tweetbot_dev.tiny_model import build_tiny_gpt2
from tweetbot_trainer.contract import S3Layout, StageRequest, StageResult
from tweetbot_trainer.hub import hub_cache_key, use_model_cache

MODEL = "alice/tiny-gpt2"


# --- which directory, and when --------------------------------------------------------------------------------

def test_each_hub_endpoint_has_a_directory_of_its_own():
    assert hub_cache_key("") == hub_cache_key("https://huggingface.co/") == "huggingface.co"
    keys = {hub_cache_key(endpoint) for endpoint in (
        "https://huggingface.co", "https://hf-mirror.example", "http://127.0.0.1:8080", "http://127.0.0.1:8081",
        "https://mirror.example/hf", "https://mirror.example/other", "https://HF-Mirror.Example/..")}
    assert len(keys) == 7  # the path of a mirror's endpoint too; the host's case does not count, the path's does
    assert hub_cache_key("https://HF-Mirror.example") == hub_cache_key("https://hf-mirror.example")
    for key in keys:
        assert "/" not in key and key not in (".", "..") and key.isprintable(), key  # one directory, inside the cache
    assert hub_cache_key("..") not in (".", "..") and hub_cache_key(".") not in (".", "..")


def test_the_cache_is_used_only_where_it_is_mounted(tmp_path):
    environ = {"HF_ENDPOINT": "http://127.0.0.1:8080/"}
    assert use_model_cache(tmp_path / "not-mounted", environ) is None
    assert environ == {"HF_ENDPOINT": "http://127.0.0.1:8080/"}
    used = use_model_cache(tmp_path, environ)
    assert used == tmp_path / "127.0.0.1%3A8080" and used.is_dir()
    assert environ["HF_HUB_CACHE"] == str(used)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_stage(tmp_path, caplog):
    (tmp_path / "huggingface.co").write_text("not a directory")  # what a root-owned directory is to uid 1000
    environ: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="tweetbot.hub"):
        assert use_model_cache(tmp_path, environ) is None
    assert environ == {}  # huggingface_hub keeps the pod's own cache
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert str(tmp_path / "huggingface.co") in warning.getMessage() and "uid 1000" in warning.getMessage()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any directory")
def test_a_read_only_cache_directory_is_not_used(tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert use_model_cache(tmp_path, {}) is None
    finally:
        tmp_path.chmod(0o755)


# --- two bots on one node, the same base model --------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A local MinIO with a bucket, and a FakeHub serving a public tiny GPT-2 as `alice/tiny-gpt2`."""
    from huggingface_hub import HfApi

    work = tmp_path_factory.mktemp("model-cache")
    with local_s3(work) as (server, s3), FakeHub(tokens={"hf_good": "alice"}) as hub:
        s3.create_bucket(Bucket="bots")
        api = HfApi(endpoint=hub.url, token="hf_good")
        api.create_repo(MODEL)
        api.upload_folder(repo_id=MODEL, folder_path=build_tiny_gpt2(work / "v1", posts(300)), commit_message="v1")
        yield SimpleNamespace(server=server, s3=s3, hub=hub, api=api, work=work)


def train(world, bot: str, cache: Path, tmp_path: Path) -> list[str]:
    """`tweetbot-trainer train` of `bot` as its Job runs it, in a fresh process (a pod) with a Hugging Face home of
    its own, the shared cache at `cache`: the files it downloaded from the Hub."""
    run_id = f"{bot}-1"
    layout = S3Layout(bucket="bots", prefix="tweetbot", namespace="bots", bot=bot, run_id=run_id,
                      endpoint=world.server.endpoint)
    request = StageRequest(stage="train", run_id=run_id, namespace="bots", bot=bot, handles=[bot], s3=layout,
                           model={"name": MODEL, "revision": "main"}, data={"validationFraction": 0.1},
                           training={"epochs": 1, "batchSize": 8, "blockSize": 64, "seed": 1})
    put_dataset(world.s3, "bots", layout, 60)
    pod = tmp_path / bot
    pod.mkdir()
    credentials = SimpleNamespace(s3_access_key=world.server.access_key, s3_secret_key=world.server.secret_key)
    world.hub.downloads.clear()
    process = start_train(credentials, request, pod, HF_ENDPOINT=world.hub.url, HF_HOME=str(pod / "hf"),
                          HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", TWEETBOT_MODEL_CACHE_PATH=str(cache))
    assert process.wait(timeout=600) == 0, (pod / "train.log").read_text()[-3000:]
    assert StageResult.from_termination_message((pod / "termination-log").read_text()).ok
    assert not (pod / "hf" / "hub").exists()  # nothing went to the pod's own cache
    return list(world.hub.downloads)


def downloaded_files(downloads: list[str]) -> set[str]:
    return {download.split("/", 2)[2] for download in downloads}


@pytest.mark.s3
def test_the_second_bot_on_a_node_downloads_no_model_file_again(world, tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the pods' environment, not this machine's
    cache = tmp_path / "node-cache"
    cache.mkdir()

    first = train(world, "first", cache, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= downloaded_files(first)
    assert all(download.startswith(f"{MODEL}@") for download in first)
    key = hub_cache_key(world.hub.url)
    assert (cache / key / "models--alice--tiny-gpt2").is_dir()  # under the endpoint's key, as huggingface_hub lays it out

    second = train(world, "second", cache, tmp_path)
    assert second == []  # `main` still resolved on the Hub (metadata only): no file came down again
    print(f"model files downloaded: first bot {len(first)}, second bot {len(second)}", file=sys.stderr)

    # The model's owner pushes new weights to main (the tokenizer unchanged): the next bot gets the new commit, and
    # downloads only the file whose contents changed (huggingface_hub's blobs are keyed by content).
    world.api.upload_folder(repo_id=MODEL, folder_path=build_tiny_gpt2(world.work / "v2", posts(300), seed=7),
                            commit_message="v2")
    third = train(world, "third", cache, tmp_path)
    assert "model.safetensors" in downloaded_files(third)
    assert "tokenizer.json" not in downloaded_files(third)
    head = world.hub.repos[MODEL].head.id
    assert (cache / key / "models--alice--tiny-gpt2" / "refs" / "main").read_text() == head
    print(f"after a new commit on main: third bot {len(third)} ({sorted(downloaded_files(third))})", file=sys.stderr)
