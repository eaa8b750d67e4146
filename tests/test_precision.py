"""`precision: auto` follows what the GPU computes in, not what torch can emulate."""

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
