"""`spec.training.method: lora`: tiny GPT-2 and Llama bases trained with peft's adapters by the stage (DeepSpeed
ZeRO-2 and the plain Trainer), the merged model loaded with pipeline(), a killed run resumed to the uninterrupted
run's adapter and optimizer state, and an adapter published alone to the local Hub and loaded from there."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from test_publish_stage import publish
from test_train_stage import kill_after_a_checkpoint, posts, put_dataset, request_for, start_train
from tweetbot_dev.tiny_model import TINY_MODELS
from tweetbot_trainer.card import CardFacts, render_card
from tweetbot_trainer.contract import HandleStats, StageRequest, StageResult
from tweetbot_trainer.errors import LoraTargetsNotFound
from tweetbot_trainer.lora import target_modules, with_adapters
from tweetbot_trainer.train import TrainArguments

# name: the modules peft gives adapters by default, the training engine tested with it.
BASES = {"gpt2": (["c_attn"], {"zeroStage": 2}), "llama": (["q_proj", "v_proj"], {})}
STATS = {"network": "X", "collectedAt": "2026-11-22T10:00:00Z",
         "handles": [{"handle": "dreamer", "downloaded": 300, "retweets": 0, "short": 0, "kept": 300}]}


def lora_request(bucket: str, endpoint: str, run_id: str, model: str, lora: dict | None = None, **training) -> StageRequest:
    request = request_for(bucket, endpoint, run_id, method="lora", learningRate=1e-2, **({"lora": lora} if lora else {}),
                          **training)
    return StageRequest(**{**request.__dict__, "model": {"name": model, "revision": "main"}})


def run_to_the_end(dev_env, request: StageRequest, directory) -> StageResult:
    directory.mkdir()
    process = start_train(dev_env, request, directory)
    assert process.wait(timeout=600) == 0, (directory / "train.log").read_text()[-5000:]
    return StageResult.from_termination_message((directory / "termination-log").read_text())


def s3_body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def final_files(s3, bucket: str, request: StageRequest) -> dict:
    return json.loads(s3_body(s3, bucket, request.s3.final_model + "manifest.json"))["files"]


def download_final(s3, bucket: str, request: StageRequest, directory):
    directory.mkdir()
    for name in final_files(s3, bucket, request):
        s3.download_file(bucket, request.s3.final_model + name, str(directory / name))
    return directory


# --- settings -----------------------------------------------------------------------------------------


def test_the_lora_settings_and_their_defaults():
    request = request_for("b", "", "r", method="lora")
    args = TrainArguments.from_request(request)
    assert (args.lora, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.lora_publish) == \
        (True, 8, 16, 0.05, None, "merged")
    args = TrainArguments.from_request(request_for("b", "", "r", method="lora", lora={"r": 4, "targetModules": ["c_attn"],
                                                                                        "publish": "adapter"}))
    assert (args.lora_r, args.lora_alpha, args.lora_target_modules, args.publishes_adapter) == (4, 16, ("c_attn",), True)
    assert not TrainArguments.from_request(request_for("b", "", "r")).lora  # full by default
    assert target_modules(None) is None and target_modules(["all-linear"]) == "all-linear"
    assert target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_modules_that_peft_cannot_find_are_named_in_the_error():
    from transformers import OlmoConfig, OlmoForCausalLM

    # OLMo is an architecture peft has no default target modules for.
    model = OlmoForCausalLM(OlmoConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(LoraTargetsNotFound, match="no default LoRA target modules for the model type 'olmo': set "
                                                  "spec.training.lora.targetModules") as failed:
        with_adapters(model, 8, 16, 0.0, None)
    assert failed.value.exit_code == LoraTargetsNotFound.exit_code
    with pytest.raises(LoraTargetsNotFound, match=r"spec.training.lora.targetModules \['c_attn'\] names no module"):
        with_adapters(model, 8, 16, 0.0, ["c_attn"])
    wrapped = with_adapters(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * (8 * 16 + 16 * 8)


def test_the_card_of_a_published_adapter():
    facts = CardFacts(repo_id="alice/dreamer", handles=[HandleStats("dreamer", 3, 0, 0, 3)], network="X",
                      collected_at="2026-11-22", base_model="Qwen/Qwen2.5-0.5B",
                      hyperparameters={"LoRA": "r 8, alpha 16, dropout 0.05, target modules q_proj, v_proj"})
    merged = render_card(facts)
    assert yaml.safe_load(merged.split("---\n")[1])["library_name"] == "transformers"
    assert "- LoRA: r 8, alpha 16, dropout 0.05, target modules q_proj, v_proj" in merged
    adapter = render_card(CardFacts(**{**facts.__dict__, "adapter": True}))
    meta = yaml.safe_load(adapter.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert "peft" in meta["tags"] and "lora" in meta["tags"]
    assert "pip install peft" in adapter


# --- the stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(dev_env, new_bucket, tmp_path_factory):
    """The tiny bases, locally (to compare weights with) and in the real S3 as a spec's `s3://` model names them."""
    s3, bucket = new_bucket("lora")
    local = {}
    for name in BASES:
        local[name] = TINY_MODELS[name](tmp_path_factory.mktemp(name), posts(400))
        for path in local[name].iterdir():
            s3.upload_file(str(path), bucket, f"base/tiny-{name}/{path.name}")
    return dev_env, s3, bucket, local


@pytest.mark.s3
@pytest.mark.parametrize("name", BASES)
def test_a_lora_run_changes_only_the_target_modules_and_loads_with_pipeline(name, world, tmp_path):
    dev_env, s3, bucket, local = world
    targets, deepspeed = BASES[name]
    request = lora_request(bucket, dev_env.s3_endpoint, f"lora-{name}", f"s3://{bucket}/base/tiny-{name}/",
                           deepspeed=deepspeed)
    put_dataset(s3, bucket, request.s3, 300)
    result = run_to_the_end(dev_env, request, tmp_path / "run")
    assert result.ok and result.metrics["steps"] > 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"LoRA r=8 alpha=16 on {', '.join(targets)}:" in log

    final = download_final(s3, bucket, request, tmp_path / "final")
    assert "model.safetensors" in final_files(s3, bucket, request)
    assert not {"adapter_model.safetensors", "adapter_config.json", "README.md"} & set(final_files(s3, bucket, request))
    training = json.loads((final / "training.json").read_text())
    assert training["method"] == "lora"
    assert training["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": targets, "publish": "merged"}
    assert training["hyperparameters"]["LoRA"] == f"r 8, alpha 16, dropout 0.05, target modules {', '.join(targets)}"
    assert training["deepspeed"] == ("ZeRO stage 2" if deepspeed else "none (one process)")

    base, merged = load_file(local[name] / "model.safetensors"), load_file(final / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed, "training changed nothing"
    # The adapters merged into their modules' weights; everything else is the base's, bit for bit.
    assert all(key.endswith(".weight") and key.split(".")[-2] in targets for key in changed), sorted(changed)
    assert {key.split(".")[-2] for key in changed} == set(targets)

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(final), device="cpu")
    assert generator("My dream is", max_new_tokens=8)[0]["generated_text"].startswith("My dream is")
    assert len(json.loads((final / "samples.json").read_text())) == 3


def optimizer_state(s3, bucket: str, request: StageRequest, step: int) -> dict:
    body = s3_body(s3, bucket, f"{request.s3.checkpoints}checkpoint-{step}/optimizer.pt")
    return torch.load(io.BytesIO(body), weights_only=True)["state"]


@pytest.mark.s3
@pytest.mark.parametrize("deepspeed", [{}, {"zeroStage": 2}], ids=["plain", "zero2"])
def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapter_and_optimizer_state(world, tmp_path, deepspeed):
    """The plain Trainer (one CPU process) and DeepSpeed ZeRO-2. No evaluation: see
    test_multi_rank_resume.two_rank_request."""
    dev_env, s3, bucket, _ = world
    epochs, every = 20, 20
    whole, killed = (lora_request(bucket, dev_env.s3_endpoint, f"{run_id}-{len(deepspeed)}", f"s3://{bucket}/base/tiny-gpt2/",
                                  lora={"publish": "adapter"}, epochs=epochs, deepspeed=deepspeed,
                                  checkpoint={"everySteps": every, "everyMinutes": 60, "keep": 2})
                     for run_id in ("lora-whole", "lora-killed"))
    whole, killed = (StageRequest(**{**request.__dict__, "data": {"validationFraction": 0.0}}) for request in (whole, killed))
    for request in (whole, killed):
        put_dataset(s3, bucket, request.s3, 300)

    resumed_from = kill_after_a_checkpoint(dev_env, s3, bucket, killed, tmp_path / "first")
    files = json.loads(s3_body(s3, bucket, f"{killed.s3.checkpoints}checkpoint-{resumed_from}/manifest.json"))["files"]
    # The adapter and the optimizer state of the adapter's parameters (the Trainer's, or DeepSpeed's ZeRO
    # shards), no copy of the base model.
    assert {"adapter_model.safetensors", "adapter_config.json", "scheduler.pt"} <= set(files)
    assert any(name.endswith("optim_states.pt") for name in files) if deepspeed else "optimizer.pt" in files
    assert "model.safetensors" not in files

    resumed = run_to_the_end(dev_env, killed, tmp_path / "second")
    reference = run_to_the_end(dev_env, whole, tmp_path / "whole")
    assert f"resuming from checkpoint {resumed_from}" in (tmp_path / "second" / "train.log").read_text()
    steps = reference.metrics["steps"]
    assert resumed.metrics["steps"] == steps and resumed_from < steps and steps % every == 0

    expected, got = (load_safetensors(s3_body(s3, bucket, request.s3.final_model + "adapter_model.safetensors"))
                     for request in (whole, killed))
    assert expected.keys() == got.keys() and all("lora_" in key for key in expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    if deepspeed:
        return  # ZeRO's optimizer state is in its own shard format; the adapter above follows from it
    expected, got = (optimizer_state(s3, bucket, request, steps) for request in (whole, killed))
    assert expected.keys() == got.keys() and expected
    for index, state in expected.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[index][moment], state[moment], rtol=1e-4, atol=1e-7, msg=f"{index} {moment}")


@pytest.mark.s3
def test_an_adapter_published_alone_loads_from_the_hub_onto_its_base(world, hub, tmp_path):
    """The base comes from the Hub by its id, as a spec names `Qwen/Qwen2.5-0.5B`: the published adapter names
    that id, so pipeline() finds the base there."""
    from huggingface_hub import HfApi

    dev_env, s3, bucket, local = world
    api = HfApi(endpoint=hub.url, token="hf_good")
    api.create_repo("alice/tiny-gpt2")
    api.upload_folder(repo_id="alice/tiny-gpt2", folder_path=str(local["gpt2"]))

    request = lora_request(bucket, dev_env.s3_endpoint, "lora-adapter", "alice/tiny-gpt2", epochs=2, deepspeed={},
                           lora={"publish": "adapter", "r": 4, "alpha": 8, "targetModules": ["all-linear"]})
    put_dataset(s3, bucket, request.s3, 300)
    run_to_the_end(dev_env, request, tmp_path / "run")

    files = set(final_files(s3, bucket, request))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "generation_config.json",
            "samples.json", "training.json"} <= files
    assert not {"model.safetensors", "README.md"} & files
    adapter = json.loads(s3_body(s3, bucket, request.s3.final_model + "adapter_config.json"))
    assert adapter["base_model_name_or_path"] == "alice/tiny-gpt2" and adapter["r"] == 4
    training = json.loads(s3_body(s3, bucket, request.s3.final_model + "training.json"))
    assert training["lora"]["targetModules"] == ["c_attn", "c_fc", "c_proj"]  # all-linear: all but the output layer
    assert len(json.loads(s3_body(s3, bucket, request.s3.final_model + "samples.json"))) == 3

    s3.put_object(Bucket=bucket, Key=request.s3.stats, Body=json.dumps(STATS).encode())
    finished, published = publish(dev_env, request.s3, tmp_path, hub={"repoId": "alice/dreamer-lora", "endpoint": hub.url},
                                  extra_env={"HF_TOKEN": "hf_good"}, handles=["dreamer"])
    assert finished.returncode == 0, finished.stderr
    head = hub.repos["alice/dreamer-lora"].head.files
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(head) and "model.safetensors" not in head
    card = head["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "alice/tiny-gpt2"
    assert "- LoRA: r 4, alpha 8, dropout 0.05, target modules c_attn, c_fc, c_proj" in card

    from transformers import pipeline

    generator = pipeline("text-generation", model="alice/dreamer-lora", device="cpu")
    assert type(generator.model).__name__ == "GPT2LMHeadModel"
    assert any("lora_A" in key for key in generator.model.state_dict())  # the adapter, loaded onto the base
    assert generator("My dream is", max_new_tokens=8)[0]["generated_text"].startswith("My dream is")
