"""The Helm chart's README (charts/tweetbot-operator/README.md), generated from Chart.yaml and the commented
values.yaml, the one source of truth for the chart's settings.

One row a value: its key, its default and its description, which is the comment above the key (the lines
right above it, no blank line between) and the one beside it. A map written in block style has rows for its
keys, and one of its own when it is commented; a list, or a map written on one line, is one value.

    python -m tweetbot_dev.chartdocs            # write charts/tweetbot-operator/README.md
    python -m tweetbot_dev.chartdocs --check    # exit 1 if the committed file differs from values.yaml's
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = Path("charts/tweetbot-operator")

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?P<rest>.*)$")
_COMMENT_BESIDE = re.compile(r"(^|\s)#\s?(?P<text>.*)$")


def _cell(text: str) -> str:
    """Plain text for a table cell: one line, no column break, no HTML (outside `code`, where none is read)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(part if inside else part.replace("<", "&lt;") for inside, part in zip([0, 1] * len(parts), parts))


def _code(value) -> str:
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def comments(text: str) -> list[tuple[str, str, bool]]:
    """(key path, description, is a block mapping) for every key of a values file, in file order. Lines of
    block lists (and everything under them) belong to the value of the key above them, not to the key tree."""
    found: list[tuple[str, str, bool]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the keys the current line is nested in
    pending: list[str] = []  # comment lines right above the next key
    in_list_under: int | None = None  # the indent of the key whose block list we are in
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if in_list_under is not None:
            if not stripped or indent > in_list_under or (indent == in_list_under and stripped.startswith("- ")):
                continue
            in_list_under = None  # a key or a comment as far out as the list's own key: the list has ended
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if stripped.startswith("- ") or stripped == "-":
            in_list_under = stack[-1][0] if stack else -1
            pending = []
            continue
        match = _KEY.match(line)
        if not match:
            pending = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"]
        path = ".".join([*(name for _, name in stack), key])
        rest = match["rest"]
        beside = _COMMENT_BESIDE.search(rest)
        value_text = rest[: beside.start()].strip() if beside else rest.strip()
        description = " ".join([*pending, beside["text"].strip() if beside else ""]).strip()
        pending = []
        block_mapping = False
        if not value_text:
            following = next((later for later in lines[number + 1:] if later.strip() and not later.strip().startswith("#")), "")
            following_indent = len(following) - len(following.lstrip(" "))
            if following.strip().startswith("- ") and following_indent >= indent:
                in_list_under = indent
            elif following_indent > indent:
                block_mapping = True
        found.append((path, description, block_mapping))
        if block_mapping:
            stack.append((indent, key))
    return found


def _lookup(values: dict, path: str):
    value = values
    for key in path.split("."):
        value = value[key]
    return value


def values_table(values_text: str) -> list[str]:
    values = yaml.safe_load(values_text) or {}
    lines = ["| key | default | description |", "| --- | --- | --- |"]
    for path, description, block_mapping in comments(values_text):
        if block_mapping and not description:
            continue
        default = "" if block_mapping else _code(_lookup(values, path))
        lines.append(f"| `{path}` | {default} | {_cell(description)} |")
    return lines


def published_address(chart_dir: Path) -> str | None:
    """Where the release workflow pushes the chart: `charts/<name>` beside the operator's image
    (ghcr.io/<owner>/tweetbot-operator -> oci://ghcr.io/<owner>/charts/tweetbot-operator); None without one."""
    chart = yaml.safe_load((Path(chart_dir) / "Chart.yaml").read_text())
    values = yaml.safe_load((Path(chart_dir) / "values.yaml").read_text()) or {}
    repository = (values.get("image") or {}).get("repository")
    return f"oci://{repository.rsplit('/', 1)[0]}/charts/{chart['name']}" if repository else None


def _install_lines(chart_dir: Path, version: str) -> list[str]:
    address = published_address(chart_dir)
    if address is None:
        return [f"helm install tweetbot {CHART} --namespace tweetbot-system --create-namespace"]
    return [f"helm install tweetbot {address} --version {version} \\",
            "    --namespace tweetbot-system --create-namespace"]


def render(chart_dir: Path) -> str:
    chart = yaml.safe_load((Path(chart_dir) / "Chart.yaml").read_text())
    values_text = (Path(chart_dir) / "values.yaml").read_text()
    name = chart["name"]
    lines = [
        f"# {name}",
        "",
        "<!-- Generated from Chart.yaml and values.yaml by `python -m tweetbot_dev.chartdocs`; do not edit. -->",
        "",
        _cell(chart.get("description", "")),
        "",
        f"Chart version `{chart['version']}`, app version `{chart.get('appVersion', '')}`"
        + (f", Kubernetes `{chart['kubeVersion']}`" if chart.get("kubeVersion") else "") + ".",
        "",
        "## Installing",
        "",
        "```sh",
        *_install_lines(chart_dir, chart["version"]),
        "helm test tweetbot --namespace tweetbot-system   # the CRD is established and the operator healthy",
        "```",
        "",
        "The chart installs the TweetBot CRD, the operator's Deployment, its ServiceAccount and least-privilege RBAC,",
        "ClusterRoles that give the built-in view, edit and admin roles access to TweetBots, a Service for metrics",
        "and health, default-deny NetworkPolicies and, on request, a ServiceMonitor. The repository's",
        "`docs/operator-guide.md` says what each does; NOTES.txt, printed after `helm install`, how to create a",
        "first bot.",
        "",
        "## Values",
        "",
        *values_table(values_text),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tweetbot_dev.chartdocs", description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=REPO / CHART)
    parser.add_argument("--out", type=Path, default=None, help="default: the chart's README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what values.yaml gives")
    args = parser.parse_args(argv)
    out = args.out or args.chart / "README.md"
    text = render(args.chart)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is not what {args.chart}/values.yaml gives: run python -m tweetbot_dev.chartdocs", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
