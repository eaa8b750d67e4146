"""A JSONL or CSV file of posts: text, and optionally id, created_at, is_repost and handle.

The file is read chunk by chunk and parsed one record at a time, keeping only the handle's first `limit`
posts, so memory follows the posts kept, not the file; MAX_FILE_BYTES bounds what is read at all.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
from typing import Iterable, Iterator

from ..errors import MalformedInput, MissingInput, redact_url
from . import ByteCap, Post, Timeline

MAX_FILE_BYTES = 512 * 2**20  # as much as an X archive (x_archive.MAX_ARCHIVE_BYTES); read again for each handle
MAX_LINE_CHARACTERS = 4 * 2**20  # one line of the file; a real post's record is a few hundred characters
TRUE = {"1", "true", "yes", "y", "t"}


def read_posts_file(chunks: Iterable[bytes], name: str) -> Iterator[dict]:
    """The records of a posts file given as chunks of bytes, CSV if `name` ends in .csv and JSONL otherwise,
    each checked to have a text."""
    lines = _lines(chunks, name)
    rows = _csv_rows(lines, name) if name.endswith(".csv") else _jsonl_rows(lines, name)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MalformedInput(f"{name} record {number} has no text field")
        yield row


def _lines(chunks: Iterable[bytes], name: str) -> Iterator[str]:
    """The lines of UTF-8 text, each with its "\\n" (a quoted CSV field can go on over several lines). Only
    "\\n" ends a line: JSON text may hold U+2028 and the other breaks that str.splitlines splits at."""
    decoder, pending, number = codecs.getincrementaldecoder("utf-8-sig")(), "", 0
    for chunk in itertools.chain(chunks, [None]):
        try:
            text = pending + decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError:
            raise MalformedInput(f"{name} is not UTF-8 text") from None
        *complete, pending = text.split("\n")
        for at, line in enumerate(complete + [pending], start=number + 1):
            if len(line) > MAX_LINE_CHARACTERS:
                raise MalformedInput(f"{name} line {at} is longer than {MAX_LINE_CHARACTERS:,} characters "
                                     "(files.MAX_LINE_CHARACTERS)")
        number += len(complete)
        yield from (line + "\n" for line in complete)
    if pending:
        yield pending


def _jsonl_rows(lines: Iterable[str], name: str) -> Iterator:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # also an integer of over 4,300 digits, or nesting too deep
                raise MalformedInput(f"{name} line {number} is not JSON") from None
            yield row


def _csv_rows(lines: Iterable[str], name: str) -> Iterator[dict]:
    number = 0
    try:
        for number, row in enumerate(csv.DictReader(lines), start=1):
            yield row
    except csv.Error as error:  # a field over csv.field_size_limit(), a quote never closed, a NUL
        raise MalformedInput(f"{name} record {number + 1} is not CSV ({error})") from None


def post_of_row(row: dict, index: int) -> Post:
    """A posts file's record (with a text) as a Post; `index` is its id when it has none."""
    return Post(str(row.get("id", index)), row["text"], str(row.get("is_repost", "")).strip().lower() in TRUE,
                str(row.get("created_at") or row.get("date") or ""))


class FileSource:
    network = "file"

    def __init__(self, uri: str, stream, max_bytes: int = MAX_FILE_BYTES):
        """`stream(uri)` gives the file's bytes in chunks (`Storage.stream`)."""
        self.uri, self.stream, self.max_bytes = uri, stream, max_bytes

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        """`since` is not used: a file has no order to trust, so it is read whole (the scrape's merge drops the
        posts it knew)."""
        shown = redact_url(self.uri)
        name = shown.rsplit("/", 1)[-1]  # without the query, so a signed URL's name still ends in .csv
        try:
            chunks = self.stream(self.uri)
        except (FileNotFoundError, PermissionError):
            raise MissingInput(f"no posts file at {shown}, or these credentials may not read it") from None
        posts, matched = [], 0
        # Read to the end whatever the limit, so that a broken file fails every handle alike.
        for row in read_posts_file(ByteCap(self.max_bytes, name, "files.MAX_FILE_BYTES").count(chunks), name):
            # A file with a handle column serves several handles; without one, every row is the handle's.
            if str(row.get("handle", handle)).lstrip("@").lower() != handle:
                continue
            if len(posts) < limit:
                posts.append(post_of_row(row, matched))
            matched += 1
        return Timeline(handle, "", posts)
