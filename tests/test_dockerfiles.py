"""The Dockerfiles, linted and checked (tests/test_images.py builds them with buildah on a Debian base)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
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


def _build_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of the first stage, continuation lines joined, comments left out."""
    stages = dockerfile.read_text().replace("\\\n", " ").split("\nFROM ")
    lines = (line.strip() for line in stages[1].splitlines()[1:])
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def _project_wheel(dockerfile: Path, scratch: Path) -> Path:
    """The project's wheel as the build stage makes it: the files its COPY lines take from the repository
    into /src, then its `pip wheel` RUN line, with this venv's pip and setuptools (the lock's version)."""
    src, wheels = scratch / "src", scratch / "wheels"
    for instruction, arguments in _build_stage(dockerfile):
        if instruction == "COPY":
            *sources, destination = arguments.split()
            for source in sources:
                target = Path(str(src) + destination.removeprefix("/src"))
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target = target / Path(source).name if destination.endswith("/") else target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / source, target)
        elif instruction == "RUN" and "pip wheel" in arguments:
            command = arguments.replace("/src", str(src)).replace("/wheels", str(wheels))
            path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            subprocess.run(["bash", "-c", command], check=True, capture_output=True, env={**os.environ, "PATH": path})
    (wheel,) = wheels.glob("tweetbot-*.whl")
    return wheel


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_the_image_wheel_carries_no_development_tooling(dockerfile, tmp_path):
    with zipfile.ZipFile(_project_wheel(REPO / dockerfile, tmp_path)) as wheel:
        names = wheel.namelist()
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.read_string(wheel.read(entry_points).decode())
    assert not [name for name in names if name.startswith("tweetbot_dev/")]
    assert "tweetbot_operator/cli.py" in names and "tweetbot_trainer/cli.py" in names
    scripts = dict(parser["console_scripts"])
    assert sorted(scripts) == ["kubectl-tweetbot", "tweetbot", "tweetbot-trainer"]  # the plugin: harmless, one wheel
    for target in scripts.values():  # no script that points at a module the image lacks
        assert target.split(":")[0].replace(".", "/") + ".py" in names, target
