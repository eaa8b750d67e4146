"""The trainer image's build-time check: torch's CUDA, the base's CUDA and DeepSpeed's ops belong together."""

from __future__ import annotations

import re
from pathlib import Path

from tweetbot_trainer.image_check import cuda_major, problems

REPO = Path(__file__).resolve().parents[1]


def test_a_torch_of_another_cuda_major_than_the_base_fails_the_build():
    assert problems("13.2", "13.0.1", "cuda", "cuda", {"fused_adam": True}, {"fused_adam": True}) == []
    assert "torch uses CUDA 13.2 but the base image is CUDA 12.8.1" in problems("13.2", "12.8.1", "cuda", "cuda", {}, {})[0]
    assert "built without CUDA" in problems(None, "13.0.1", "cuda", "cuda", {}, {})[0]


def test_ops_built_for_another_accelerator_or_missing_fail_the_build():
    assert problems("13.2", "13.0.1", "cuda", "cpu", {}, {}) == [
        "DeepSpeed's ops were built for 'cpu', not DS_ACCELERATOR='cuda'"]
    assert problems("13.2", "13.0.1", "cuda", "cuda", {"fused_adam": True, "cpu_adam": False}, {"fused_adam": False}) == [
        "DS_BUILD_FUSED_ADAM=1 but DeepSpeed has no prebuilt fused_adam op"]


def test_the_dockerfiles_cuda_is_the_locked_torchs_major():
    dockerfile = (REPO / "Dockerfile.trainer").read_text()
    lock = (REPO / "requirements" / "trainer.lock").read_text()
    base_cuda = re.search(r"^ARG CUDA_VERSION=(\S+)", dockerfile, re.M).group(1)
    torch_cuda = re.search(r"^nvidia-cuda-runtime==(\S+)", lock, re.M).group(1)
    assert cuda_major(base_cuda) == cuda_major(torch_cuda)
    assert "python -m tweetbot_trainer.image_check" in dockerfile
