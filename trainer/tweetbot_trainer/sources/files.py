"""A JSONL or CSV file of posts: text, and optionally id, created_at, is_repost and handle."""

from __future__ import annotations

import csv
import io
import json

from ..errors import MalformedInput
from . import Post, Timeline

TRUE = {"1", "true", "yes", "y", "t"}


def parse_posts_file(content: str, name: str) -> list[dict]:
    if name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(content)))
    else:
        rows = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise MalformedInput(f"{name} line {number} is not JSON") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MalformedInput(f"{name} record {number} has no text field")
    return rows


class FileSource:
    network = "file"

    def __init__(self, uri: str, read):
        self.uri, self.read = uri, read
        self._rows: list[dict] | None = None

    def fetch(self, handle: str, limit: int) -> Timeline:
        if self._rows is None:
            self._rows = parse_posts_file(self.read(self.uri).decode("utf-8-sig"), self.uri.rsplit("/", 1)[-1])
        # A file with a handle column serves several handles; without one, every row is the handle's.
        rows = [r for r in self._rows if str(r.get("handle", handle)).lstrip("@").lower() == handle]
        posts = [
            Post(str(r.get("id", index)), r["text"], str(r.get("is_repost", "")).strip().lower() in TRUE,
                 str(r.get("created_at") or r.get("date") or ""))
            for index, r in enumerate(rows)
        ]
        return Timeline(handle, "", posts[:limit])
