"""The images cannot be built here (no Docker engine), so their Dockerfiles are linted and checked."""

from __future__ import annotations

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
    assert "[operator]" in text and "torch" not in text.replace("no torch", "")
