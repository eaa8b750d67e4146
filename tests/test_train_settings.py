"""The train stage's settings: `precision: auto` follows what the GPU computes in, DeepSpeed runs where it helps."""

from __future__ import annotations

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


def test_one_cpu_process_with_the_defaults_trains_without_deepspeed(monkeypatch, tmp_path):
    """Measured: on one CPU process DeepSpeed only cost tokens/s and memory (see `uses_deepspeed`)."""
    from tweetbot_trainer import train
    from tweetbot_trainer.contract import S3Layout, StageRequest

    def request(**deepspeed):
        return StageRequest(stage="train", run_id="r", namespace="n", bot="b", handles=["a"],
                            s3=S3Layout("b", "p", "n", "b", "r"), training={"deepspeed": deepspeed})

    monkeypatch.setattr(train, "DEEPSPEED_CONFIG_PATH", str(tmp_path / "absent.json"))
    defaults = train.TrainArguments.from_request(request())
    assert train.training_arguments(defaults, "out", 10, False, 1, cuda=False)["deepspeed"] is None
    assert train.describe_deepspeed(None) == "none (one CPU process)"
    for args, world, cuda in ((defaults, 1, True), (defaults, 2, False),
                              (train.TrainArguments.from_request(request(zeroStage=3)), 1, False)):
        config = train.training_arguments(args, "out", 10, False, world, cuda=cuda)["deepspeed"]
        assert config["zero_optimization"]["stage"] == args.zero_stage
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    monkeypatch.setattr(train, "DEEPSPEED_CONFIG_PATH", str(tmp_path / "ds.json"))
    assert train.training_arguments(defaults, "out", 10, False, 1, cuda=False)["deepspeed"]["zero_optimization"]["stage"] == 1
