"""The Dockerfiles, linted and checked (tests/test_images.py builds them with buildah on a Debian base)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(REPO.glob("Dockerfile*"))
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run([HADOLINT, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_non_root_without_secrets(dockerfile):
    text = dockerfile.read_text()
    final_stage = text.rsplit("\nFROM ", 1)[-1]
    assert "\nUSER " in final_stage and "USER root" not in final_stage
    for word in ("TOKEN=", "SECRET", "AWS_ACCESS_KEY_ID=", "HF_TOKEN="):
        assert word not in text


def test_the_trainer_image_prebuilds_deepspeed_ops():
    text = (REPO / "Dockerfile.trainer").read_text()
    assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_BUILD_CPU_ADAM=1" in text and "nvidia/cuda" in text


def test_the_operator_image_has_no_torch():
    text = (REPO / "Dockerfile.operator").read_text()
    assert "requirements/operator.lock" in text and "torch" not in text.replace("no torch", "")
    lock = (REPO / "requirements" / "operator.lock").read_text()
    assert "kopf==" in lock and "torch" not in lock


@pytest.mark.parametrize(
    "dockerfile, defaults",
    [
        ("Dockerfile.operator", {"BASE_IMAGE": "python:3.11-slim"}),
        (
            "Dockerfile.trainer",
            {
                "BASE_IMAGE": "nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04",
                "BUILD_IMAGE": "nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04",
            },
        ),
    ],
)
def test_the_base_images_are_build_arguments_defaulting_to_the_upstream_ones(dockerfile, defaults):
    text = (REPO / dockerfile).read_text()
    for name, default in defaults.items():
        assert f"\nARG {name}={default}\n" in text
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms and all(image.startswith("${") for image in froms)
    # One Dockerfile for Ubuntu 24.04 (python3 is 3.12), python:3.11-slim and Debian bookworm (3.11).
    assert "python3 -m venv" in text and "python3." not in text and "RUN python " not in text


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_installs_are_pinned_by_the_lock_file(name):
    text = (REPO / f"Dockerfile.{name}").read_text()
    lock = (REPO / "requirements" / f"{name}.lock").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", pin) for pin in pins)
    assert not any(pin.startswith("tweetbot==") for pin in pins) and any(pin.startswith("setuptools==") for pin in pins)
    for line in text.replace("\\\n", " ").splitlines():
        if "pip install" in line:
            assert "--no-deps" in line, line


def test_deepspeed_builds_after_torch_without_build_isolation():
    text = (REPO / "Dockerfile.trainer").read_text()
    first = text.index("grep -v '^deepspeed==' /src/requirements/trainer.lock")
    assert first < text.index("--no-build-isolation -r /src/requirements/trainer.lock")
