"""The TweetBot API reference (docs/api-reference.md), generated from the CRD, the one source of truth.

One table per object of the schema (spec and status, and every object or list of objects within them): each
field's path, type, default, constraints (required, enum, bounds, pattern, CEL rules by their message) and
description.

    python -m tweetbot_dev.apidocs            # write docs/api-reference.md
    python -m tweetbot_dev.apidocs --check    # exit 1 if the committed file differs from the CRD's
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = Path("crds/huggingtweets.dev_tweetbots.yaml")
OUT = Path("docs/api-reference.md")
VERSIONING = Path("docs/api-versioning.md")  # the API versioning policy, linked from the header


def load(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _cell(text: str) -> str:
    """Plain text for a table cell: one line, no column break, no HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _code(value, quoted: bool = False) -> str:
    """`value` as code; strings as they are unless `quoted` (a default "4" is not the number 4)."""
    text = value if isinstance(value, str) and not quoted else json.dumps(value)
    return "`" + text.replace("|", "\\|") + "`"


def _rules(schema: dict) -> list[str]:
    """The schema's CEL rules, by their messages."""
    return [_cell(rule["message"]) for rule in schema.get("x-kubernetes-validations") or []]


def _anchor(path: str) -> str:
    """GitHub's anchor for a heading `path`: lower case, punctuation other than '-' and '_' dropped."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def _is_table(schema: dict) -> bool:
    return schema.get("type") == "object" and "properties" in schema


def _type(schema: dict, path: str) -> str:
    kind = schema.get("type", "")
    if kind == "array":
        items = schema.get("items") or {}
        return ("list of " if _is_table(items) else "[]") + _type(items, path + "[]")
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type(schema['additionalProperties'], path)}"
    if _is_table(schema):
        return f"[object](#{_anchor(path)})"
    return kind + (f" ({schema['format']})" if "format" in schema else "")


def _constraints(schema: dict, required: bool) -> list[str]:
    found = ["required"] if required else []
    if "enum" in schema:
        found.append("one of " + ", ".join(_code(value) for value in schema["enum"]))
    for key, word in (("minimum", "min"), ("maximum", "max"), ("minLength", "min length"),
                      ("maxLength", "max length"), ("minItems", "min items"), ("maxItems", "max items"),
                      ("maxProperties", "max entries")):
        if key in schema:
            exclusive = schema.get({"minimum": "exclusiveMinimum", "maximum": "exclusiveMaximum"}.get(key, ""))
            found.append(f"{'>' if key == 'minimum' else '<'} {schema[key]}" if exclusive else f"{word} {schema[key]}")
    if "pattern" in schema:
        found.append(f"pattern {_code(schema['pattern'])}")
    if "x-kubernetes-list-map-keys" in schema:
        found.append("a list keyed by " + ", ".join(_code(key) for key in schema["x-kubernetes-list-map-keys"]))
    found += _rules(schema)
    return found


def _field_row(path: str, schema: dict, required: bool) -> str:
    default = _code(schema["default"], quoted=True) if "default" in schema else ""
    items = schema.get("items") or {}
    nested = items if schema.get("type") == "array" else schema.get("additionalProperties") or {}
    constraints = _constraints(schema, required)
    each = _constraints(nested, False)
    if each:
        constraints.append("each: " + ", ".join(each))
    return (f"| `{path}` | {_type(schema, path)} | {default} | {'; '.join(constraints)} | "
            f"{_cell(schema.get('description', ''))} |")


def _objects(path: str, schema: dict):
    """Every object with properties under `path`, depth first, the object itself first. Its own rules are
    shown in the row that names it."""
    if schema.get("type") == "array":
        yield from _objects(path + "[]", schema.get("items") or {})
        return
    if not _is_table(schema):
        return
    yield path, schema
    for name, child in schema["properties"].items():
        yield from _objects(f"{path}.{name}", child)


def _object_section(path: str, schema: dict) -> list[str]:
    lines = [f"### `{path}`", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    lines += ["| field | type | default | constraints | description |", "| --- | --- | --- | --- | --- |"]
    required = set(schema.get("required") or [])
    for name, child in schema["properties"].items():
        lines.append(_field_row(f"{path}.{name}", child, name in required))
    return lines + [""]


def render(crd: dict) -> str:
    spec = crd["spec"]
    names = spec["names"]
    lines = [
        f"# {names['kind']} API reference",
        "",
        f"<!-- Generated from {CRD} by `python -m tweetbot_dev.apidocs`; do not edit. -->",
        "",
        f"Generated from [`{CRD}`](../{CRD}), the one source of truth (`kubectl explain tweetbot.spec` shows the",
        "same descriptions). Defaults are filled in by the API server; a constraint is enforced at `kubectl apply`.",
        f"The versioning policy, [{VERSIONING.name}]({VERSIONING.name}), says what may change within a version and",
        "how the next one will be served and stored.",
    ]
    for version in spec["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        lines += [
            "",
            f"## {spec['group']}/{version['name']} {names['kind']}",
            "",
            f"{spec['scope']}; plural `{names['plural']}`, short names "
            + ", ".join(f"`{short}`" for short in names.get("shortNames", []))
            + (f", categories {', '.join(f'`{c}`' for c in names['categories'])}" if names.get("categories") else "")
            + ". " + _cell(schema.get("description", "")),
            "",
        ]
        rules = _rules(schema)
        if rules:
            lines += ["Rules on the whole object:", "", *(f"- {rule}" for rule in rules), ""]
        columns = version.get("additionalPrinterColumns") or []
        if columns:
            lines += ["`kubectl get` columns (priority 1 with `-o wide`):", "",
                      "| column | type | from | priority |", "| --- | --- | --- | --- |"]
            lines += [f"| {c['name']} | {c['type']} | `{c['jsonPath']}` | {c.get('priority', 0)} |" for c in columns]
            lines.append("")
        for top in ("spec", "status"):
            lines += [f"## The {top}", ""]
            for path, obj in _objects(top, schema["properties"][top]):
                lines += _object_section(path, obj)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tweetbot_dev.apidocs", description=__doc__.splitlines()[0])
    parser.add_argument("--crd", type=Path, default=REPO / CRD)
    parser.add_argument("--out", type=Path, default=REPO / OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the CRD gives")
    args = parser.parse_args(argv)
    text = render(load(args.crd))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what {args.crd} gives: run python -m tweetbot_dev.apidocs", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
