"""The image keys, and both images really built with buildah on the Debian base (cached per machine)."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tweetbot_dev import images

# What containerd and Kubernetes accept as a local image reference.
REF = re.compile(r"^localhost/tweetbot-(operator|trainer|base):[0-9a-f]{12}$")


@pytest.fixture
def tree(tmp_path):
    """A minimal copy of what the Dockerfiles read."""
    files = {
        "Dockerfile.operator": "FROM scratch\n",
        "Dockerfile.trainer": "FROM scratch\n",
        "requirements/operator.lock": "kopf==1.0\n",
        "requirements/trainer.lock": "torch==2.0\n",
        "pyproject.toml": "[project]\nname = 'tweetbot'\n",
        "README.md": "# TweetBot\n",
        "operator/tweetbot_operator/__init__.py": "",
        "trainer/tweetbot_trainer/cli.py": "print('hi')\n",
        "hack/tweetbot_dev/binaries.py": "X = 1\n",
        "hack/tweetbot_dev/__pycache__/binaries.cpython-311.pyc": "bytecode",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return tmp_path


def test_the_context_is_every_copied_file_sorted_without_bytecode(tree):
    (tree / "trainer/tweetbot_trainer/stray.pyc").write_text("bytecode")
    assert images.context_files(tree) == [
        "README.md",
        "operator/tweetbot_operator/__init__.py",
        "pyproject.toml",
        "trainer/tweetbot_trainer/cli.py",
    ]


@pytest.mark.parametrize(
    "relative",
    ["trainer/tweetbot_trainer/cli.py", "README.md", "pyproject.toml",
     "requirements/trainer.lock", "Dockerfile.trainer"],
)
def test_the_key_changes_with_every_input(tree, relative):
    before = images.image_key("trainer", tree)
    (tree / relative).write_text((tree / relative).read_text() + "# changed\n")
    assert images.image_key("trainer", tree) != before


def test_the_key_changes_with_a_new_file_and_ignores_bytecode(tree):
    before = images.image_key("operator", tree)
    (tree / "hack/tweetbot_dev/binaries.py").write_text("X = 2\n")  # development tooling is not in the images
    (tree / "operator/tweetbot_operator/__pycache__").mkdir()
    (tree / "operator/tweetbot_operator/__pycache__/x.cpython-311.pyc").write_text("bytecode")
    assert images.image_key("operator", tree) == before
    (tree / "operator/tweetbot_operator/new.py").write_text("")
    assert images.image_key("operator", tree) != before


def test_each_image_reads_only_its_own_dockerfile_and_lock(tree):
    operator, trainer = images.image_key("operator", tree), images.image_key("trainer", tree)
    (tree / "requirements/trainer.lock").write_text("torch==2.1\n")
    (tree / "Dockerfile.trainer").write_text("FROM debian\n")
    assert images.image_key("operator", tree) == operator and images.image_key("trainer", tree) != trainer


def test_the_key_follows_the_base_image(tree, monkeypatch):
    before, base = images.image_key("operator", tree), images.base_key()
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    assert images.base_key() != base and images.image_key("operator", tree) != before
    assert REF.match(images.base_ref())


def test_an_existing_archive_is_returned_without_buildah(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("TWEETBOT_CACHE", str(tmp_path / "cache"))
    expected = images.image_for("trainer", tree)
    expected.archive.parent.mkdir(parents=True)
    expected.archive.write_bytes(b"an archive")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    image = images.ensure_image("trainer", log=lambda message: None, root=tree)
    assert image == expected and REF.match(image.ref) and image.ref.endswith(":" + image.key)
    assert image.archive == tmp_path / "cache" / "images" / f"tweetbot-trainer-{image.key}.tar"


def test_the_real_keys_cover_the_real_repository():
    for name in images.SPECS:
        image = images.image_for(name)
        assert REF.match(image.ref), image.ref
    assert "trainer/tweetbot_trainer/train.py" in images.context_files()
    assert not [path for path in images.context_files() if path.startswith("hack/")]


# --- the real images ------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def built():
    """Both images (the first build on a machine takes ~10 min, then the cache answers at once)."""
    return {name: images.ensure_image(name) for name in images.SPECS}


def _archive_config(archive: Path) -> tuple[dict, list[str]]:
    """The image config and the layer blob names (top layer last) of an OCI archive."""
    with tarfile.open(archive) as tar:
        def blob(descriptor):
            return tar.extractfile("blobs/" + descriptor["digest"].replace(":", "/"))

        index = json.load(tar.extractfile("index.json"))
        manifest = json.load(blob(index["manifests"][0]))
        config = json.load(blob(manifest["config"]))
        return config, ["blobs/" + layer["digest"].replace(":", "/") for layer in manifest["layers"]]


def _top_layers_hold(archive: Path, layers: list[str], wanted: set[str]) -> set[str]:
    """Which of `wanted` the top layers hold (the project's wheel is installed in the last ones)."""
    found: set[str] = set()
    with tarfile.open(archive) as outer:
        for name in reversed(layers[-2:]):
            with tarfile.open(fileobj=outer.extractfile(name), mode="r|*") as layer:
                found |= {member.name.lstrip("./") for member in layer} & wanted
    return found


@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    "name, user, entrypoint",
    [("operator", "65532:65532", "opt/venv/bin/tweetbot"), ("trainer", "1000:1000", "opt/venv/bin/tweetbot-trainer")],
)
def test_the_built_image_is_non_root_with_home_in_tmp(built, name, user, entrypoint):
    image = built[name]
    assert REF.match(image.ref) and image.archive.is_file()
    config, layers = _archive_config(image.archive)
    assert config["config"]["User"] == user
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    assert env["HOME"] == "/tmp" and env["PATH"].startswith("/opt/venv/bin:")
    if name == "trainer":
        for variable in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[variable].startswith("/tmp/"), variable
    assert _top_layers_hold(image.archive, layers, {entrypoint}) == {entrypoint}
    assert images.ensure_image(name) == image  # cached: no build


# Neither image carries the development tooling, nor a console script for it.
NO_TOOLING = "! command -v tweetbot-dev && python3 -c 'import importlib.util as u; assert not u.find_spec(\"tweetbot_dev\")'"


@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    "name, command",
    [
        ("operator", "tweetbot --help && python3 -c 'import kopf, kubernetes, boto3, prometheus_client'"),
        ("trainer", "tweetbot-trainer --help && python3 -c 'import torch, transformers, deepspeed, accelerate'"),
    ],
)
def test_the_image_runs_as_its_non_root_user(built, name, command):
    image = built[name]
    container = subprocess.run(
        ["buildah", "from", "--pull=never", image.ref], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        user = "65532:65532" if name == "operator" else "1000:1000"
        result = subprocess.run(
            ["buildah", "run", "--network", "none", "--user", user, "--env", "DS_ACCELERATOR=cpu", container,
             "--", "sh", "-c", f"id -u && {command} && {NO_TOOLING} && touch /opt/venv/x"],
            capture_output=True, text=True, timeout=600,
        )
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    # Runs as its user, imports everything, cannot write into the venv.
    assert result.returncode != 0 and "Permission denied" in result.stderr, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == user.split(":")[0]
    assert "usage:" in result.stdout
