"""The documentation: docs/api-reference.md is what tweetbot_dev.apidocs generates from the CRD, and every
relative link in README.md, CHANGELOG.md and docs/*.md leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from tweetbot_dev import apidocs

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # no links in code


def _generated() -> str:
    return apidocs.render(apidocs.load(REPO / apidocs.CRD))


def test_api_reference_is_generated_from_the_crd():
    committed = (REPO / "docs" / "api-reference.md").read_text()
    assert committed == _generated(), (
        "docs/api-reference.md is stale: run `python -m tweetbot_dev.apidocs`")


def test_api_reference_shows_fields_with_their_defaults_and_bounds():
    text = _generated()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert "3200" in rows["spec.source.maxPostsPerHandle"] and "max 1000000" in rows["spec.source.maxPostsPerHandle"]
    assert '"tweetbot"' in rows["spec.output.s3.prefix"] and "required" in rows["spec.output.s3.bucket"]
    assert "`Retain`, `Delete`" in rows["spec.deletionPolicy"] and '"Retain"' in rows["spec.deletionPolicy"]
    assert "### `spec.training.deepspeed`" in text and "### `status.conditions[]`" in text
    assert "set it or zeroStage/offload, not both" in text  # an object's CEL rule, by its message


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    out = tmp_path / "api-reference.md"
    out.write_text("stale\n")
    assert apidocs.main(["--check", "--out", str(out)]) == 1
    assert apidocs.main(["--out", str(out)]) == 0
    assert apidocs.main(["--check", "--out", str(out)]) == 0


def test_relative_links_lead_to_files():
    assert len(DOCS) > 1, "docs/*.md missing"
    broken = []
    for doc in DOCS:
        for target in LINK.findall(CODE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken
