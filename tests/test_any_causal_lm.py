"""Base models other than GPT-2: tiny random Llama and Qwen2 models, each with its architecture's special tokens
(`tiny_model.py`), trained by the stage, killed and resumed, published to the local Hub and loaded back with
pipeline(); and the loading code's rules (the tokenizer's own EOS, the config's context length, a pad token,
no remote code, the Hub token from the environment)."""

from __future__ import annotations

import json

import pytest
import yaml

from test_publish_stage import publish
from test_train_stage import kill_after_a_checkpoint, posts, put_dataset, request_for, start_train
from tweetbot_dev.tiny_model import LLAMA_EOS, QWEN2_EOS, QWEN2_PAD, TINY_MODELS
from tweetbot_trainer.contract import StageRequest, StageResult
from tweetbot_trainer.errors import BaseModelUnavailable
from tweetbot_trainer.train import TrainArguments, load_model_and_tokenizer, make_blocks, resolve_model, tokenize_posts

# name: (architecture, its EOS, its pad token once loaded, context length). Llama's context is shorter than
# the spec's blockSize of 64, so the blocks must shrink to it.
BASES = {"llama": ("LlamaForCausalLM", LLAMA_EOS, LLAMA_EOS, 48), "qwen2": ("Qwen2ForCausalLM", QWEN2_EOS, QWEN2_PAD, 128)}


def build(name: str, directory):
    context = BASES[name][3]
    return TINY_MODELS[name](directory, posts(400), max_position_embeddings=context)


@pytest.mark.parametrize("name", BASES)
def test_posts_are_separated_by_the_tokenizers_own_eos(name, tmp_path):
    architecture, eos, pad, context = BASES[name]
    model, tokenizer = load_model_and_tokenizer(str(build(name, tmp_path / name)), "main")
    assert type(model).__name__ == architecture
    assert tokenizer.eos_token == eos and tokenizer.pad_token == pad

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos_id = tokenizer.eos_token_id
    assert tokenize_posts(tokenizer, ["my dream is", "the sea"]) == [eos_id, *ids("my dream is"), eos_id, *ids("the sea"), eos_id]

    blocks = make_blocks(posts(300), tokenizer, model, TrainArguments(block_size=64, validation_fraction=0.1))
    assert blocks.size == min(64, context)
    assert all(len(block) == blocks.size for block in blocks.train + blocks.eval)


def test_gpt2_keeps_its_format(tmp_path):
    from tweetbot_dev.tiny_model import EOS

    model, tokenizer = load_model_and_tokenizer(str(TINY_MODELS["gpt2"](tmp_path / "gpt2", posts(100))), "main")
    assert tokenize_posts(tokenizer, ["my dream is", "the sea"]) == tokenizer(EOS + "my dream is" + EOS + "the sea" + EOS)["input_ids"]
    assert make_blocks(posts(300), tokenizer, model, TrainArguments(block_size=256)).size == 128  # n_positions


def test_a_tokenizer_without_an_eos_is_refused(tmp_path):
    directory = build("llama", tmp_path / "no-eos")  # Qwen2's tokenizer class would default to <|endoftext|>
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelUnavailable, match="has no end-of-text token"):
        load_model_and_tokenizer(str(directory), "main")


def test_remote_code_in_a_base_model_is_not_run(tmp_path):
    directory = build("llama", tmp_path / "remote")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tweetbot-custom", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (directory / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    (directory / "custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    with pytest.raises(BaseModelUnavailable, match="contains custom code"):
        load_model_and_tokenizer(str(directory), "main")
    assert not ran.exists()


def test_a_gated_base_model_loads_with_the_hub_token_from_the_environment(hub, tmp_path, monkeypatch):
    """The operator hands the spec's Hub token to the train stage as HF_TOKEN; the loader sends it."""
    from huggingface_hub import HfApi, get_token

    api = HfApi(endpoint=hub.url, token="hf_good")
    api.create_repo("alice/gated-llama", private=True)
    api.upload_folder(repo_id="alice/gated-llama", folder_path=build("llama", tmp_path / "gated"))

    assert resolve_model(None, "alice/gated-llama", tmp_path) == "alice/gated-llama"
    with pytest.raises(BaseModelUnavailable, match="cannot load the base model 'alice/gated-llama'"):
        load_model_and_tokenizer("alice/gated-llama", "main")  # anonymous: the repository looks missing
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert get_token() == "hf_good"
    model, tokenizer = load_model_and_tokenizer("alice/gated-llama", "main")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token == LLAMA_EOS


@pytest.fixture(scope="module")
def bases(dev_env, new_bucket, tmp_path_factory):
    """The tiny bases in the real S3, as a spec's `s3://` model names them."""
    s3, bucket = new_bucket("anylm")
    for name in BASES:
        for path in build(name, tmp_path_factory.mktemp(name)).iterdir():
            s3.upload_file(str(path), bucket, f"base/tiny-{name}/{path.name}")
    return dev_env, s3, bucket


def run_to_the_end(dev_env, request: StageRequest, directory) -> StageResult:
    directory.mkdir()
    process = start_train(dev_env, request, directory)
    assert process.wait(timeout=600) == 0, (directory / "train.log").read_text()[-5000:]
    return StageResult.from_termination_message((directory / "termination-log").read_text())


@pytest.mark.s3
@pytest.mark.parametrize("name", BASES)
def test_train_resume_publish_and_generate(name, bases, hub, tmp_path):
    dev_env, s3, bucket = bases
    architecture, eos, pad, context = BASES[name]
    request = request_for(bucket, dev_env.s3_endpoint, f"run-{name}", epochs=6,
                          checkpoint={"everySteps": 10, "everyMinutes": 60, "keep": 2})
    request = StageRequest(**{**request.__dict__, "model": {"name": f"s3://{bucket}/base/tiny-{name}/", "revision": "main"}})
    put_dataset(s3, bucket, request.s3, 300)

    resumed_from = kill_after_a_checkpoint(dev_env, s3, bucket, request, tmp_path / "killed")

    result = run_to_the_end(dev_env, request, tmp_path / "resumed")
    assert f"resuming from checkpoint {resumed_from}" in (tmp_path / "resumed" / "train.log").read_text()
    assert result.metrics["steps"] > resumed_from and result.metrics["evalLoss"] < 5.0  # random init: ln(~290 tokens) = 5.7

    final = request.s3.final_model
    generation = json.loads(s3.get_object(Bucket=bucket, Key=final + "generation_config.json")["Body"].read())
    assert generation["prefix"] == eos
    training = json.loads(s3.get_object(Bucket=bucket, Key=final + "training.json")["Body"].read())
    assert training["hyperparameters"]["block size"] == min(64, context)

    stats = {"network": "X", "collectedAt": "2026-11-22T10:00:00Z",
             "handles": [{"handle": "dreamer", "downloaded": 300, "retweets": 0, "short": 0, "kept": 300}]}
    s3.put_object(Bucket=bucket, Key=request.s3.stats, Body=json.dumps(stats).encode())
    repo_id = f"alice/dreamer-{name}"
    finished, published = publish(dev_env, request.s3, tmp_path, hub={"repoId": repo_id, "endpoint": hub.url},
                                  extra_env={"HF_TOKEN": "hf_good"}, handles=["dreamer"])
    assert finished.returncode == 0, finished.stderr

    card = hub.repos[repo_id].head.files["README.md"].decode()
    assert architecture in card and f"s3://{bucket}/base/tiny-{name}/" in card and "GPT-2" not in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert name in meta["tags"] and "gpt2" not in meta["tags"]
    metrics = {metric["type"]: metric["value"] for metric in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"loss": result.metrics["evalLoss"], "perplexity": result.metrics["perplexity"]}

    from transformers import pipeline

    generator = pipeline("text-generation", model=repo_id, trust_remote_code=False, device="cpu")
    assert type(generator.model).__name__ == architecture
    assert generator.tokenizer.eos_token == eos and generator.tokenizer.pad_token == pad
    texts = generator(["My dream is", "The sea"], max_new_tokens=8, batch_size=2)  # a batch needs the pad token
    assert all(text[0]["generated_text"].startswith(prompt) for text, prompt in zip(texts, ["My dream is", "The sea"]))
