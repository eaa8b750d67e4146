"""A release, locally: what .github/workflows/release.yml does before it pushes anything, and the version bump.

    tweetbot-dev release --bump 0.2.0             # pyproject.toml, Chart.yaml (both versions, both images), the
                                                  # chart's README and a `## 0.2.0 (date)` heading atop CHANGELOG.md
    tweetbot-dev release --dry-run v0.2.0         # check, lint, package the chart into dist/, write the notes
    tweetbot-dev release --dry-run 0.2.0 --images # ... and build both images, tagged <repository>:0.2.0

The release workflow runs the same dry run (with `--outputs "$GITHUB_OUTPUT"`), then pushes what it made.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import chartdocs
from .binaries import KUBERNETES_VERSION

REPO = Path(__file__).resolve().parents[2]
CHART = chartdocs.CHART

# A tag is v + the version; pre-releases (0.2.0-rc.1) are versions too.
VERSION = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?")
# A release's heading in CHANGELOG.md: `## 0.2.0 (2027-01-01)`. The issue sections below it, down to the
# next release's heading, are its notes.
RELEASE_HEADING = re.compile(r"^## (" + VERSION.pattern + r") \(", re.MULTILINE)


class ReleaseError(Exception):
    """What stops a release, said so that the person cutting it knows what to change."""


@dataclass(frozen=True)
class Versions:
    """The three places that name the project's version; a release needs them equal to its tag."""

    pyproject: str
    chart: str
    app: str

    @classmethod
    def read(cls, root: Path) -> Versions:
        chart = yaml.safe_load((root / CHART / "Chart.yaml").read_text())
        pyproject = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
        return cls(pyproject, str(chart["version"]), str(chart["appVersion"]))

    def disagreements(self, version: str) -> list[str]:
        return [
            f"{where}: {found}"
            for where, found in (
                ("pyproject.toml [project] version", self.pyproject),
                (f"{CHART}/Chart.yaml version", self.chart),
                (f"{CHART}/Chart.yaml appVersion", self.app),
            )
            if found != version
        ]


@dataclass(frozen=True)
class Images:
    """The repositories (without tags) of the chart's default images, from its values.yaml."""

    operator: str
    trainer: str

    @classmethod
    def read(cls, chart: Path) -> Images:
        values = yaml.safe_load((chart / "values.yaml").read_text())
        return cls(values["image"]["repository"], values["trainer"]["image"]["repository"])

    def items(self) -> tuple[tuple[str, str], ...]:
        return (("operator", self.operator), ("trainer", self.trainer))


def parse_version(text: str) -> str:
    """`v0.2.0` (a tag) or `0.2.0` -> `0.2.0`."""
    version = text.removeprefix("v")
    if not VERSION.fullmatch(version):
        raise ReleaseError(f"{text!r} is not a version: give MAJOR.MINOR.PATCH, e.g. 0.2.0 or the tag v0.2.0")
    return version


def release_notes(changelog: str, version: str) -> str | None:
    """The sections between `version`'s heading and the previous release's (or the end); None without one."""
    headings = list(RELEASE_HEADING.finditer(changelog))
    for index, heading in enumerate(headings):
        if heading.group(1) == version:
            start = changelog.index("\n", heading.end()) + 1
            end = headings[index + 1].start() if index + 1 < len(headings) else len(changelog)
            return changelog[start:end].strip() + "\n"
    return None


# --- the bump -----------------------------------------------------------------------------------------


def _replace(text: str, pattern: str, replacement: str, where: str, count: int = 1) -> str:
    new, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if found != count:
        raise ReleaseError(f"{where}: expected {count} match(es) of {pattern!r}, found {found}")
    return new


def bump(root: Path, version: str, today: datetime.date, log=print) -> None:
    """Set every version field to `version` and put its heading atop CHANGELOG.md's sections."""
    images = Images.read(root / CHART)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(_replace(pyproject.read_text(), r'^version = "[^"]*"$', f'version = "{version}"',
                                  "pyproject.toml"))
    chart_yaml = root / CHART / "Chart.yaml"
    text = _replace(chart_yaml.read_text(), r"^version: .*$", f"version: {version}", str(chart_yaml))
    text = _replace(text, r"^appVersion: .*$", f'appVersion: "{version}"', str(chart_yaml))
    for _, repository in images.items():  # Artifact Hub's list of the images a default install runs
        text = _replace(text, rf"(image: {re.escape(repository)}):\S+$", rf"\1:{version}", str(chart_yaml))
    chart_yaml.write_text(text)
    (root / CHART / "README.md").write_text(chartdocs.render(root / CHART))  # it shows the chart's version
    changelog = root / "CHANGELOG.md"
    text = changelog.read_text()
    if release_notes(text, version) is None:
        first = re.search(r"^## ", text, re.MULTILINE)
        at = first.start() if first else len(text)
        text = f"{text[:at]}## {version} ({today.isoformat()})\n\n{text[at:]}"
        changelog.write_text(text)
    log(f"{version} in pyproject.toml, {CHART}/Chart.yaml (version, appVersion, artifacthub.io/images), its "
        f"README.md and atop CHANGELOG.md: review with `git diff`, commit, tag v{version} and push the tag")


# --- the dry run --------------------------------------------------------------------------------------


def _helm(helm: Path, *args: str) -> str:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise ReleaseError(f"helm {args[0]} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def _default_images(helm: Path, packaged: Path) -> dict[str, str]:
    """The operator's and the stage pods' images as a default install of the packaged chart renders them."""
    # helm's default Kubernetes version is below the chart's kubeVersion: the one the tests run.
    rendered = _helm(helm, "template", "release", str(packaged), "--kube-version", KUBERNETES_VERSION)
    deployment = next(doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    return {"operator": container["image"], "trainer": env["TWEETBOT_TRAINER_IMAGE"]}


def dry_run(root: Path, version: str, out: Path, helm: Path, log=print) -> dict[str, str]:
    """Check and package a release of `version` into `out`; returns what the workflow publishes."""
    problems = Versions.read(root).disagreements(version)
    if problems:
        raise ReleaseError(
            f"{version} is not the version of\n" + "".join(f"  {problem}\n" for problem in problems)
            + f"set them with `tweetbot-dev release --bump {version}`, or tag the version they name"
        )
    changelog = root / "CHANGELOG.md"
    notes = release_notes(changelog.read_text(), version)
    if notes is None:
        raise ReleaseError(f"CHANGELOG.md has no heading `## {version} (date)` above the sections this release "
                           f"ships: `tweetbot-dev release --bump {version}` adds it")
    chart = root / CHART
    images = Images.read(chart)
    annotations = yaml.safe_load((chart / "Chart.yaml").read_text())["annotations"]
    annotated = yaml.safe_load(annotations["artifacthub.io/images"])
    for _, repository in images.items():
        if f"{repository}:{version}" not in [entry["image"] for entry in annotated]:
            raise ReleaseError(f"Chart.yaml's artifacthub.io/images does not list {repository}:{version}")
    if (chart / "README.md").read_text() != chartdocs.render(chart):
        raise ReleaseError(f"{CHART}/README.md is not what Chart.yaml and values.yaml give: run python -m "
                           "tweetbot_dev.chartdocs")
    log(f"versions   {version} in pyproject.toml and Chart.yaml (version, appVersion, artifacthub.io/images)")

    _helm(helm, "lint", "--strict", str(chart))
    log("helm lint  --strict: passed")
    out.mkdir(parents=True, exist_ok=True)
    _helm(helm, "package", str(chart), "--destination", str(out))
    packaged = out / f"{chart.name}-{version}.tgz"
    with tarfile.open(packaged) as archive:
        app_version = str(yaml.safe_load(archive.extractfile(f"{chart.name}/Chart.yaml"))["appVersion"])
    if app_version != version:
        raise ReleaseError(f"the packaged chart's appVersion is {app_version}, not {version}")
    rendered = _default_images(helm, packaged)
    for name, repository in images.items():
        if rendered[name] != f"{repository}:{version}":
            raise ReleaseError(f"the packaged chart's {name} image is {rendered[name]}, not {repository}:{version}")
    log(f"chart      {packaged} -> {chartdocs.published_address(chart)}")
    log(f"images     {' '.join(f'{repository}:{version}' for _, repository in images.items())}")

    notes_file = out / "release-notes.md"
    notes_file.write_text(notes)
    log(f"notes      {notes_file} ({len(notes.splitlines())} lines of CHANGELOG.md)")
    return {
        "version": version,
        "chart": str(packaged),
        "notes": str(notes_file),
        "operator-image": images.operator,
        "trainer-image": images.trainer,
    }


def build_images(root: Path, version: str, log=print) -> list[str]:
    """Both images built here the way the tests build them (buildah, on the Debian base), tagged for the registry."""
    from .images import ensure_image

    images = Images.read(root / CHART)
    tagged = []
    for name, repository in images.items():
        built = ensure_image(name, log, root)
        subprocess.run(["buildah", "tag", built.ref, f"{repository}:{version}"], check=True)
        tagged.append(f"{repository}:{version}")
    return tagged


def main(args: argparse.Namespace) -> int:
    """`tweetbot-dev release`: exit 1, with the reason on stderr, when the release would fail."""
    err = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    out = lambda message: print(message, flush=True)  # noqa: E731
    try:
        version = parse_version(args.version)
        if args.bump:
            bump(args.root, version, datetime.date.today(), log=err)
            return 0
        if args.helm is None:
            from .binaries import ensure_binaries

            args.helm = ensure_binaries(err) / "helm"
        published = dry_run(args.root, version, args.out, args.helm, log=out)
        if args.images:
            out(f"built      {' '.join(build_images(args.root, version, log=err))} (buildah, on the Debian base)")
        else:
            out("images     not built (--images builds them with buildah)")
        if args.outputs:
            with open(args.outputs, "a") as outputs:
                outputs.writelines(f"{key}={value}\n" for key, value in published.items())
    except ReleaseError as error:
        err(f"release {args.version}: {error}")
        return 1
    out(f"dry run of {version}: ready; pushing the tag v{version} publishes it")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dry-run", action="store_true",
                        help="check and package the release as the release workflow does, without pushing")
    action.add_argument("--bump", action="store_true",
                        help="set the version in pyproject.toml and Chart.yaml, and head CHANGELOG.md with it")
    parser.add_argument("version", help="the version (0.2.0) or its tag (v0.2.0)")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="where the chart and notes go (default: dist)")
    parser.add_argument("--helm", type=Path, help="the helm binary (default: the pinned build, built if missing)")
    parser.add_argument("--images", action="store_true",
                        help="also build both images with buildah, tagged <repository>:<version> (minutes)")
    parser.add_argument("--outputs", type=Path, help="append name=value lines of what is published (GITHUB_OUTPUT)")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this one)")
