"""The chart's README: what tweetbot_dev.chartdocs generates from Chart.yaml and the commented values.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from tweetbot_dev import chartdocs

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / chartdocs.CHART


def _rows(text: str) -> dict[str, list[str]]:
    """key -> [default, description], from the values table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _leaves(values: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        found += _leaves(value, path + ".") if isinstance(value, dict) and value else [path]
    return found


def test_chart_readme_is_generated_from_values_yaml():
    committed = (CHART / "README.md").read_text()
    assert committed == chartdocs.render(CHART), (
        "charts/tweetbot-operator/README.md is stale: run `python -m tweetbot_dev.chartdocs`")


def test_every_value_has_a_row_with_its_default_and_description():
    text = chartdocs.render(CHART)
    rows = _rows(text)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every leaf has a row (a map written on one line, like trainer.scrape, is one leaf) ...
    for leaf in _leaves(values):
        assert leaf in rows or any(leaf.startswith(row + ".") for row in rows), leaf
    # ... and every row says what it is for.
    assert not [key for key, (default, description) in rows.items() if not description]
    assert rows["trainer.maxGpusPerNode"][0] == "`8`" and "largest GPU node" in rows["trainer.maxGpusPerNode"][1]
    assert rows["crds.keep"][0] == "`true`" and "helm uninstall" in rows["crds.keep"][1]  # a comment after the value
    assert rows["trainer.scrape"][0] == '`{"cpu": "500m", "memory": "1Gi"}`'
    assert rows["image.tag"][0] == '`""`' and "appVersion" in rows["image.tag"][1]
    assert "169.254.0.0/16" in rows["networkPolicy.stageEgress"][0]  # a list in block style, whole
    assert "S3" in rows["s3"][1] and rows["s3"][0] == ""  # a commented map has a row of its own
    assert "tweetbot-operator" in text.splitlines()[0] and CHART.joinpath("Chart.yaml").exists()


def test_comments_attach_to_the_key_below_or_beside_them(tmp_path):
    (tmp_path / "Chart.yaml").write_text("name: c\ndescription: d\nversion: 1.0.0\nappVersion: '2'\n")
    (tmp_path / "values.yaml").write_text(
        "# A header, not about any key.\n\n"
        "# The first.\n# Two lines.\na: 1\n"
        "b:\n  # Nested | piped.\n  c: x  # and beside\n  d:\n    - e: f\n      g: h  # inside a list: not a key\n"
        "  i: {j: k}\n")
    rows = _rows(chartdocs.render(tmp_path))
    assert rows == {"a": ["`1`", "The first. Two lines."],
                    "b.c": ['`"x"`', "Nested \\| piped. and beside"],
                    "b.d": ['`[{"e": "f", "g": "h"}]`', ""],
                    "b.i": ['`{"j": "k"}`', ""]}


def test_check_fails_on_a_stale_file(tmp_path):
    out = tmp_path / "README.md"
    out.write_text("stale\n")
    assert chartdocs.main(["--check", "--out", str(out)]) == 1
    assert chartdocs.main(["--out", str(out)]) == 0
    assert chartdocs.main(["--check", "--out", str(out)]) == 0
