"""The release machinery: the GitHub workflows pass actionlint (which runs shellcheck on their scripts) and ask
for no more rights than each job needs, and `tweetbot-dev release --dry-run` does what the release workflow
does before it pushes anything, on a copy of what a release reads (pyproject.toml, the chart, CHANGELOG.md).
`--images` (both images built with buildah and tagged for the registry) is not run here: it is the minutes
`tests/test_images.py` already spends."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tweetbot_dev import chartdocs
from tweetbot_dev.binaries import GO_TOOLS, ensure_binaries
from tweetbot_dev.release import release_notes

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
OPERATOR_IMAGE = "ghcr.io/huggingtweets/tweetbot-operator"
TRAINER_IMAGE = "ghcr.io/huggingtweets/tweetbot-trainer"
CHART_ADDRESS = "oci://ghcr.io/huggingtweets/charts/tweetbot-operator"  # beside the images, as the workflow pushes it


@pytest.fixture(scope="module")
def binaries() -> Path:
    return ensure_binaries()


def actionlint(binaries: Path, *files: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    assert shutil.which("shellcheck"), "actionlint checks the scripts with shellcheck: `tweetbot-dev build` installs it"
    return subprocess.run([str(binaries / "actionlint"), "-no-color", *map(str, files)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_actionlint_finds_nothing_in_the_workflows(binaries):
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert {path.name for path in workflows} >= {"ci.yml", "release.yml"}
    result = actionlint(binaries, *workflows)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_report_a_script_and_a_permission_mistake(binaries, tmp_path):
    """The test above means something: an unquoted variable (shellcheck's SC2086) and a permission that does not
    exist are both findings."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: push\n"
        "permissions: {contents: read, package: write}\n"
        "jobs:\n"
        "  one:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - run: echo $HOME\n"
    )
    result = actionlint(binaries, broken, cwd=tmp_path)
    assert result.returncode == 1
    assert "SC2086" in result.stdout and '"package"' in result.stdout, result.stdout


def test_each_release_job_asks_only_for_the_rights_it_uses():
    workflow = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    assert workflow[True] == {"push": {"tags": ["v*.*.*"]}}  # PyYAML reads the key `on` as True
    assert workflow["permissions"] == {}
    rights = {name: job.get("permissions") for name, job in workflow["jobs"].items()}
    assert all(isinstance(granted, dict) for granted in rights.values()), rights  # none inherits a default
    writes = {name: {scope for scope, level in granted.items() if level == "write"} for name, granted in rights.items()}
    assert writes == {"check": set(), "images": {"packages"}, "chart": {"packages"}, "github-release": {"contents"}}


def test_the_release_workflow_builds_helm_at_the_pinned_version():
    helm = next(tool for tool in GO_TOOLS if tool.binary == "helm")
    assert f"HELM_VERSION: {helm.version}" in (WORKFLOWS / "release.yml").read_text()


def test_the_release_workflow_builds_the_cuda_trainer_for_amd64_only():
    images = yaml.safe_load((WORKFLOWS / "release.yml").read_text())["jobs"]["images"]
    platforms = {entry["image"]: entry["platforms"] for entry in images["strategy"]["matrix"]["include"]}
    assert platforms == {"operator": "linux/amd64,linux/arm64", "trainer": "linux/amd64"}


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of what a release reads, at the repository's current versions."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "charts" / "tweetbot-operator", root / "charts" / "tweetbot-operator")
    for name in ("pyproject.toml", "CHANGELOG.md"):
        shutil.copy(REPO / name, root / name)
    return root


def dev(*args, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tweetbot_dev.cli", *map(str, args), "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_bumped_version_passes_the_dry_run(project, binaries, tmp_path):
    bumped = dev("release", "--bump", "0.2.0", root=project)
    assert bumped.returncode == 0, bumped.stderr
    assert 'version = "0.2.0"' in (project / "pyproject.toml").read_text()
    chart_yaml = (project / "charts" / "tweetbot-operator" / "Chart.yaml").read_text()
    chart = yaml.safe_load(chart_yaml)
    assert (chart["version"], chart["appVersion"]) == ("0.2.0", "0.2.0")
    assert f"{OPERATOR_IMAGE}:0.2.0" in chart_yaml and f"{TRAINER_IMAGE}:0.2.0" in chart_yaml
    assert ":0.1.0" not in chart_yaml
    # The sections this release ships: the CHANGELOG's own first two, whichever issues they are.
    first, second = re.findall(r"^## .*$", (REPO / "CHANGELOG.md").read_text(), re.M)[:2]
    changelog = (project / "CHANGELOG.md").read_text()
    assert changelog.index("\n## 0.2.0 (") < changelog.index(f"\n{first}")
    readme = (project / "charts" / "tweetbot-operator" / "README.md").read_text()  # generated from Chart.yaml
    assert readme == chartdocs.render(project / "charts" / "tweetbot-operator") and "version `0.2.0`" in readme

    dist, outputs = tmp_path / "dist", tmp_path / "github-output"
    result = dev("release", "--dry-run", "v0.2.0", "--out", dist, "--helm", binaries / "helm", "--outputs", outputs,
                 root=project)
    assert result.returncode == 0, result.stdout + result.stderr
    packaged = dist / "tweetbot-operator-0.2.0.tgz"
    with tarfile.open(packaged) as archive:
        assert yaml.safe_load(archive.extractfile("tweetbot-operator/Chart.yaml"))["appVersion"] == "0.2.0"
    notes = (dist / "release-notes.md").read_text()
    assert notes.startswith(first) and second in notes
    for line in (f"chart      {packaged} -> {CHART_ADDRESS}",
                 f"images     {OPERATOR_IMAGE}:0.2.0 {TRAINER_IMAGE}:0.2.0",
                 "not built (--images builds them with buildah)"):
        assert line in result.stdout, result.stdout
    assert dict(line.split("=", 1) for line in outputs.read_text().splitlines()) == {
        "version": "0.2.0",
        "chart": str(packaged),
        "notes": str(dist / "release-notes.md"),
        "operator-image": OPERATOR_IMAGE,
        "trainer-image": TRAINER_IMAGE,
    }


def test_a_tag_that_is_not_the_projects_version_is_refused(project, binaries, tmp_path):
    result = dev("release", "--dry-run", "v0.3.0", "--out", tmp_path / "dist", "--helm", binaries / "helm",
                 root=project)
    assert result.returncode == 1
    for says in ("0.3.0 is not the version of", "pyproject.toml [project] version: 0.1.0",
                 "Chart.yaml version: 0.1.0", "Chart.yaml appVersion: 0.1.0", "tweetbot-dev release --bump 0.3.0"):
        assert says in result.stderr, result.stderr
    assert not (tmp_path / "dist").exists()


def test_a_version_without_its_changelog_heading_is_refused(project, binaries, tmp_path):
    result = dev("release", "--dry-run", "0.1.0", "--out", tmp_path / "dist", "--helm", binaries / "helm",
                 root=project)
    assert result.returncode == 1
    assert "CHANGELOG.md has no heading `## 0.1.0 (" in result.stderr, result.stderr


def test_a_packaged_chart_whose_default_image_is_not_the_version_is_refused(project, binaries, tmp_path):
    assert dev("release", "--bump", "0.2.0", root=project).returncode == 0
    values = project / "charts" / "tweetbot-operator" / "values.yaml"
    values.write_text(values.read_text().replace('tag: ""  # defaults to the chart', 'tag: "latest"  # defaults', 1))
    (project / "charts" / "tweetbot-operator" / "README.md").write_text(chartdocs.render(values.parent))
    result = dev("release", "--dry-run", "0.2.0", "--out", tmp_path / "dist", "--helm", binaries / "helm",
                 root=project)
    assert result.returncode == 1
    says = f"the packaged chart's operator image is {OPERATOR_IMAGE}:latest, not {OPERATOR_IMAGE}:0.2.0"
    assert says in result.stderr, result.stderr


def test_a_chart_readme_older_than_its_values_is_refused(project, binaries, tmp_path):
    """The packaged chart carries its README.md, which Artifact Hub shows."""
    assert dev("release", "--bump", "0.2.0", root=project).returncode == 0
    values = project / "charts" / "tweetbot-operator" / "values.yaml"
    values.write_text(values.read_text().replace("maxGpusPerNode: 8", "maxGpusPerNode: 4", 1))
    result = dev("release", "--dry-run", "0.2.0", "--out", tmp_path / "dist", "--helm", binaries / "helm",
                 root=project)
    assert result.returncode == 1
    says = "README.md is not what Chart.yaml and values.yaml give: run python -m tweetbot_dev.chartdocs"
    assert says in result.stderr, result.stderr


def test_the_chart_readme_installs_the_published_chart():
    readme = (REPO / "charts" / "tweetbot-operator" / "README.md").read_text()
    version = yaml.safe_load((REPO / "charts" / "tweetbot-operator" / "Chart.yaml").read_text())["version"]
    assert f"helm install tweetbot {CHART_ADDRESS} --version {version} " in readme


def test_release_notes_are_the_sections_between_two_version_headings():
    changelog = (
        "# Changelog\n\nIntro.\n\n"
        "## Issue 9 — unreleased (2027-01-02)\n\n- not yet\n\n"
        "## 0.2.0 (2027-01-01)\n\n"
        "## Issue 8 — b (2027-01-01)\n\n- eight\n\n## Issue 7 — a (2026-12-31)\n\n- seven\n\n"
        "## 0.1.0 (2026-12-03)\n\n## Issue 6 — c\n\n- six\n"
    )
    assert release_notes(changelog, "0.2.0") == (
        "## Issue 8 — b (2027-01-01)\n\n- eight\n\n## Issue 7 — a (2026-12-31)\n\n- seven\n")
    assert release_notes(changelog, "0.1.0") == "## Issue 6 — c\n\n- six\n"
    assert release_notes(changelog, "0.3.0") is None
