"""Build the operator and trainer images with buildah, from a Debian base made here, once per machine.

No registry is reachable here, so the base image is made from Debian packages (mmdebstrap), both
Dockerfiles are built on it with ``buildah bud`` (their ``BASE_IMAGE`` build argument; users build them on
the real upstream bases), and each image is written to an OCI archive that containerd imports
(``ctr -n k8s.io images import``). Everything is keyed by a digest of its inputs:

- the base by its suite, packages and mirror: ``localhost/tweetbot-base:<key>``;
- an image by its Dockerfile, lock file, build arguments, base key and every file the Dockerfile copies:
  ``localhost/tweetbot-<name>:<key>`` and ``~/.cache/tweetbot/images/tweetbot-<name>-<key>.tar``.

An archive that exists is returned at once; a build runs under a file lock, so concurrent callers build once.

    python -m tweetbot_dev.images [operator|trainer|all]   # build (or find) the images, print refs and archives
    python -m tweetbot_dev.images --lock                   # re-resolve requirements/*.lock (Python 3.11, x86_64)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tweetbot_dev.binaries import KUBERNETES_VERSION, cache_root

REPO = Path(__file__).resolve().parents[2]

BASE_REPOSITORY = "localhost/tweetbot-base"
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
# python3-venv: the Dockerfiles' `python3 -m venv`; passwd: the trainer image's `useradd`.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")

# What every Dockerfile copies from the repository (besides its lock file).
# The product only: hack/ is development tooling, never shipped.
CONTEXT = ("pyproject.toml", "README.md", "operator", "trainer")
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# The lock files are resolved for the Python of the Debian base (and of python:3.11-slim).
LOCK_PYTHON = (3, 11)


@dataclass(frozen=True)
class ImageSpec:
    name: str
    extra: str  # the pyproject extra the image installs
    build_args: dict[str, str] = field(default_factory=dict)  # besides BASE_IMAGE
    two_bases: bool = False  # a BUILD_IMAGE argument too (the trainer's build stage)

    @property
    def dockerfile(self) -> str:
        return f"Dockerfile.{self.name}"

    @property
    def lock(self) -> str:
        return f"requirements/{self.name}.lock"

    @property
    def repository(self) -> str:
        return f"localhost/tweetbot-{self.name}"


SPECS = {
    "operator": ImageSpec("operator", "operator"),
    # The Debian base has no CUDA: no compiler, DeepSpeed on its CPU accelerator, no op prebuilt.
    "trainer": ImageSpec(
        "trainer",
        "trainer",
        {
            "BUILD_PACKAGES": "",
            "DS_ACCELERATOR": "cpu",
            "DS_BUILD_FUSED_ADAM": "0",
            "DS_BUILD_CPU_ADAM": "0",
        },
        two_bases=True,
    ),
}


@dataclass(frozen=True)
class Image:
    ref: str  # e.g. localhost/tweetbot-trainer:0123456789ab, as containerd and Kubernetes see it
    archive: Path  # the OCI archive (gzip layers) for `ctr -n k8s.io images import`
    key: str


# --- keys ---------------------------------------------------------------------------------------------


def base_key() -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([BASE_SUITE, BASE_VARIANT, sorted(BASE_PACKAGES), BASE_MIRROR, BASE_ENV]).encode())
    return digest.hexdigest()[:12]


def base_ref() -> str:
    return f"{BASE_REPOSITORY}:{base_key()}"


def context_files(root: Path = REPO) -> list[str]:
    """Every file the Dockerfiles copy, relative to `root`, sorted; no bytecode caches."""
    files: list[str] = []
    for entry in CONTEXT:
        path = root / entry
        if path.is_file():
            files.append(entry)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path} (copied by the Dockerfiles) is missing")
        for directory, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(name for name in dirnames if name not in SKIPPED_DIRS)
            for name in filenames:
                if not name.endswith(SKIPPED_SUFFIXES):
                    files.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(files)


def image_key(name: str, root: Path = REPO) -> str:
    """sha256 over the Dockerfile, the lock file, the build arguments, the base key and the copied files."""
    spec = SPECS[name]
    digest = hashlib.sha256()
    digest.update(json.dumps({"base": base_key(), "build_args": spec.build_args}, sort_keys=True).encode())
    for relative in [spec.dockerfile, spec.lock, *context_files(root)]:
        content = (root / relative).read_bytes()
        digest.update(f"\0{relative}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:12]


def images_dir() -> Path:
    return cache_root() / "images"


def image_for(name: str, root: Path = REPO) -> Image:
    """Where `name`'s image is (or would be) for the current inputs; builds nothing."""
    key = image_key(name, root)
    return Image(f"{SPECS[name].repository}:{key}", images_dir() / f"tweetbot-{name}-{key}.tar", key)


# --- building -----------------------------------------------------------------------------------------


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kwargs)


@contextmanager
def _step(what: str, log):
    log(f"{what} ...")
    started = time.monotonic()
    yield
    log(f"  {what}: {time.monotonic() - started:.1f}s")


@contextmanager
def _locked(name: str):
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits for the first build, then reuses it
        yield


def _has_image(ref: str) -> bool:
    result = subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True)
    return result.returncode == 0


def _require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"building the images needs {', '.join(missing)} (Debian: apt-get install {' '.join(missing)})"
        )


def ensure_base_image(log=print) -> str:
    """The Debian base image (python3 + venv), built with mmdebstrap and buildah if this machine lacks it."""
    ref = base_ref()
    _require("buildah")
    if _has_image(ref):
        return ref
    _require("mmdebstrap")
    with _locked("base"):
        if _has_image(ref):
            return ref
        log(f"making the base image {ref} from Debian {BASE_SUITE} packages")
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix="base-") as scratch:
            rootfs = Path(scratch) / "rootfs.tar"
            with _step("mmdebstrap", log):
                _run(
                    [
                        "mmdebstrap",
                        "--quiet",
                        f"--variant={BASE_VARIANT}",
                        f"--include={','.join(BASE_PACKAGES)}",
                        BASE_SUITE,
                        str(rootfs),
                        BASE_MIRROR,
                    ],
                    stdout=sys.stderr,
                )
            with _step("buildah commit (base)", log):
                container = _run(
                    ["buildah", "from", "scratch"], capture_output=True, text=True
                ).stdout.strip()
                try:
                    _run(["buildah", "add", "--quiet", container, str(rootfs), "/"], stdout=sys.stderr)
                    config = ["buildah", "config", "--cmd", "/bin/bash"]
                    for env in BASE_ENV:
                        config += ["--env", env]
                    _run([*config, container])
                    _run(["buildah", "commit", "--quiet", "--rm", container, ref], stdout=subprocess.DEVNULL)
                except BaseException:
                    subprocess.run(["buildah", "rm", container], capture_output=True)
                    raise
    return ref


def _pip_config() -> dict[str, str]:
    """The host's pip settings that the build's pip needs too (index, CA bundle, timeouts)."""
    wanted = {"index-url", "extra-index-url", "trusted-host", "cert", "default-timeout", "timeout", "retries", "proxy"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in wanted and value:
            settings[key] = value.strip().strip("'\"")
    return settings


def _build_context(name: str, root: Path, into: Path) -> None:
    spec = SPECS[name]
    for relative in [spec.dockerfile, spec.lock, *context_files(root)]:
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)


def _build(name: str, image: Image, root: Path, log) -> None:
    spec = SPECS[name]
    base = ensure_base_image(log)
    args = {"BASE_IMAGE": base, **({"BUILD_IMAGE": base} if spec.two_bases else {}), **spec.build_args}
    pip_cache = Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip")
    pip_cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix=f"{name}-") as scratch:
        context = Path(scratch) / "context"
        _build_context(name, root, context)
        settings = _pip_config()
        volumes = [f"{pip_cache}:/root/.cache/pip"]
        if "cert" in settings:
            volumes.append(f"{settings['cert']}:{settings['cert']}:ro")
        pip_conf = Path(scratch) / "pip.conf"
        pip_conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        volumes.append(f"{pip_conf}:/etc/pip.conf:ro")
        argv = ["buildah", "bud", "--layers", "--pull=never", "--network", "host", "-t", image.ref]
        argv += ["-f", str(context / spec.dockerfile)]
        for key, value in sorted(args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        for volume in volumes:
            argv += ["-v", volume]
        with _step(f"buildah bud {image.ref}", log):
            _run([*argv, str(context)], stdout=sys.stderr)
    partial = image.archive.with_name(image.archive.name + ".partial")
    partial.unlink(missing_ok=True)
    # gzip layers: buildah 1.28 ignores --disable-compression for oci-archive, and an uncompressed
    # docker-archive (twice the size) was no faster to write and slower to import (trainer: 42 s and 70 s
    # against 47 s and 63 s).
    with _step(f"buildah push {image.ref} to {image.archive.name}", log):
        _run(["buildah", "push", "--quiet", image.ref, f"oci-archive:{partial}:{image.ref}"], stdout=subprocess.DEVNULL)
    partial.rename(image.archive)
    log(f"  {image.archive} ({image.archive.stat().st_size / 1e6:.0f} MB)")


def _prune(name: str, keep: Image, log) -> None:
    """Older archives of `name` are GBs each: drop them, and their tags (the layers stay for --layers reuse)."""
    for archive in images_dir().glob(f"tweetbot-{name}-*.tar"):
        if archive != keep.archive:
            archive.unlink(missing_ok=True)
            old_ref = f"{SPECS[name].repository}:{archive.stem.rsplit('-', 1)[-1]}"
            subprocess.run(["buildah", "rmi", old_ref], capture_output=True)
            log(f"  removed the old {archive.name} and {old_ref}")


def ensure_image(name: str, log=print, root: Path = REPO) -> Image:
    """`name`'s image ("operator" or "trainer") as a local buildah image and an OCI archive, built if missing."""
    if name not in SPECS:
        raise ValueError(f"unknown image {name!r}: one of {', '.join(SPECS)}")
    image = image_for(name, root)
    if image.archive.is_file():
        return image
    _require("buildah")
    with _locked(name):
        if image.archive.is_file():
            return image
        started = time.monotonic()
        log(f"building {image.ref}")
        _build(name, image, root, log)
        log(f"{image.ref} ready in {time.monotonic() - started:.0f}s")
        _prune(name, image, log)
        _prune_build_stages(keep=len(SPECS))
    return image


def _prune_build_stages(keep: int) -> None:
    """Each build leaves its build stage's last image untagged: 12 GB for the trainer (its venv), a new one for
    every change of the code, and they filled this machine's disk in a day. The newest `keep` (one an image,
    built last) stay as the cache of the next build: removing an image removes its untagged parents too, the
    layers of the installed requirements among them."""
    listed = subprocess.run(["buildah", "images", "--json", "--filter", "dangling=true"], capture_output=True, text=True)
    untagged = sorted(json.loads(listed.stdout or "[]"), key=lambda image: image.get("created", 0), reverse=True)
    stale = [image["id"] for image in untagged[keep:]]
    if stale:
        subprocess.run(["buildah", "rmi", *stale], capture_output=True)


PAUSE_IMAGE = "localhost/tweetbot-pause:3.10"


def ensure_pause_archive(log=print) -> Path:
    """The real node's sandbox image: Kubernetes' own pause.c, compiled statically (no registry to pull it from)."""
    archive = images_dir() / "pause-3.10.tar"
    if archive.is_file():
        return archive
    _require("buildah", "gcc")
    with _locked("pause"):
        if archive.is_file():
            return archive
        gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
        source = Path(gomodcache) / "k8s.io" / f"kubernetes@{KUBERNETES_VERSION}" / "build" / "pause" / "linux" / "pause.c"
        if not source.exists():
            _run(["go", "mod", "download", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], capture_output=True)
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix="pause-") as scratch:
            binary = Path(scratch) / "pause"
            _run(["gcc", "-static", "-Os", "-DVERSION=v3.10", "-o", str(binary), str(source)])
            container = _run(["buildah", "from", "scratch"], capture_output=True, text=True).stdout.strip()
            try:
                _run(["buildah", "copy", "--quiet", container, str(binary), "/pause"], stdout=subprocess.DEVNULL)
                _run(["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container])
                _run(["buildah", "commit", "--quiet", "--rm", container, PAUSE_IMAGE], stdout=subprocess.DEVNULL)
            except BaseException:
                subprocess.run(["buildah", "rm", container], capture_output=True)
                raise
        partial = archive.with_name(archive.name + ".partial")
        _run(["buildah", "push", "--quiet", PAUSE_IMAGE, f"oci-archive:{partial}:{PAUSE_IMAGE}"], stdout=subprocess.DEVNULL)
        partial.rename(archive)
        log(f"built {PAUSE_IMAGE}")
    return archive


# --- lock files ---------------------------------------------------------------------------------------


def resolve_lock(name: str, root: Path = REPO) -> str:
    """requirements/<name>.lock's text: pip's resolution of tweetbot[<extra>] and its build backend."""
    if sys.version_info[:2] != LOCK_PYTHON or platform.machine() != "x86_64" or sys.platform != "linux":
        raise RuntimeError(f"resolve the lock files with Python {'.'.join(map(str, LOCK_PYTHON))} on Linux x86_64")
    spec = SPECS[name]
    build_requires = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report), f"{root}[{spec.extra}]", *build_requires],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    pins = sorted(
        (item["metadata"]["name"], item["metadata"]["version"])
        for item in installs
        if item["metadata"]["name"] != "tweetbot"
    )
    pins.sort(key=lambda pin: pin[0].lower().replace("_", "-"))
    header = (
        f"# Every package of the {name} image ({spec.dockerfile}): tweetbot[{spec.extra}] and its build backend\n"
        f"# ({', '.join(build_requires)}), as pip resolves them for Linux x86_64, Python "
        f"{'.'.join(map(str, LOCK_PYTHON))}.\n"
        "# Regenerate (with Python 3.11 on Linux x86_64, from the repository's root):\n"
        "#   PYTHONPATH=hack python3.11 -m tweetbot_dev.images --lock\n"
    )
    return header + "".join(f"{package}=={version}\n" for package, version in pins)


def write_locks(root: Path = REPO, log=print) -> None:
    for name in SPECS:
        path = root / SPECS[name].lock
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(resolve_lock(name, root))
        log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tweetbot_dev.images", description=__doc__.split("\n")[0])
    parser.add_argument("image", nargs="?", default="all", choices=[*SPECS, "all"])
    parser.add_argument("--lock", action="store_true", help="re-resolve requirements/*.lock instead of building")
    options = parser.parse_args(argv)
    if options.lock:
        write_locks()
        return 0
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    for name in SPECS if options.image == "all" else [options.image]:
        started = time.monotonic()
        image = ensure_image(name, log=log)
        print(f"{name}\t{image.ref}\t{image.archive}\t({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
