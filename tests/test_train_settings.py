"""The train stage's settings: `precision: auto` follows what the GPU computes in, DeepSpeed runs where it helps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tweetbot_trainer.train import precision_flags


@pytest.mark.parametrize("gpu, capability, expected", [
    ("T4", (7, 5), "fp16"),  # bf16 only emulated: torch's is_bf16_supported() says True
    ("V100", (7, 0), "fp16"),
    ("A100", (8, 0), "bf16"),
    ("L4", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16"),
])
def test_auto_precision_follows_the_gpus_compute_capability(monkeypatch, gpu, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision_flags("auto") == {"bf16": expected == "bf16", "fp16": expected == "fp16"}


def test_auto_is_fp32_on_cpu_and_a_chosen_precision_stands(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_flags("auto") == {"bf16": False, "fp16": False}
    assert precision_flags("fp16") == {"bf16": False, "fp16": True}


def test_one_process_with_the_defaults_trains_without_deepspeed(monkeypatch, tmp_path):
    """One rank, on a GPU or the CPU: DeepSpeed has nothing to partition and costs start-up (see `uses_deepspeed`)."""
    from tweetbot_trainer import train
    from tweetbot_trainer.contract import S3Layout, StageRequest

    def request(**deepspeed):
        return StageRequest(stage="train", run_id="r", namespace="n", bot="b", handles=["a"],
                            s3=S3Layout("b", "p", "n", "b", "r"), training={"deepspeed": deepspeed})

    monkeypatch.setattr(train, "DEEPSPEED_CONFIG_PATH", str(tmp_path / "absent.json"))
    defaults = train.TrainArguments.from_request(request())
    for cuda in (False, True):
        assert train.training_arguments(defaults, "out", 10, False, 1, cuda=cuda)["deepspeed"] is None
    assert train.describe_deepspeed(None) == "none (one process)"
    for args, world, cuda in ((defaults, 2, True), (defaults, 2, False),
                              (train.TrainArguments.from_request(request(zeroStage=3)), 1, False)):
        config = train.training_arguments(args, "out", 10, False, world, cuda=cuda)["deepspeed"]
        assert config["zero_optimization"]["stage"] == args.zero_stage
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    monkeypatch.setattr(train, "DEEPSPEED_CONFIG_PATH", str(tmp_path / "ds.json"))
    assert train.training_arguments(defaults, "out", 10, False, 1, cuda=False)["deepspeed"]["zero_optimization"]["stage"] == 1


def test_a_process_without_deepspeed_never_imports_it(tmp_path):
    """accelerate imports DeepSpeed (and so MLflow) on every Trainer whenever it is installed: seconds of a GPU
    pod's start for nothing when the stage trains without it."""
    code = (
        "import sys\n"
        "from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments\n"
        "from tweetbot_trainer.train import skip_deepspeed_import\n"
        "skip_deepspeed_import()\n"
        "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))\n"
        "Trainer(model=model, args=TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[]))\n"
        "print(sorted(name for name in ('deepspeed', 'mlflow') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
