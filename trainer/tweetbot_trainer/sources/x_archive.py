"""The data/tweets.js file of the archive a person downloads from X: every post, no 3,200 cap.

The file is read chunk by chunk and parsed one entry at a time, keeping of each entry only what a Post
needs and of all posts only the newest `limit`, so the scrape pod's memory bounds neither the archive's
size nor its number of posts; MAX_ARCHIVE_BYTES bounds what is read at all.
"""

from __future__ import annotations

import codecs
import heapq
import json
import re
from typing import Iterable, Iterator

from ..errors import MalformedInput, MissingInput, redact_url
from . import ByteCap, Post, Timeline

MAX_ARCHIVE_BYTES = 512 * 2**20  # one handle's tweets.js and parts together: half the scrape pod's 1 GiB
MAX_ARCHIVE_PARTS = 100  # tweets-part1.js ... beside tweets.js
MAX_ENTRY_CHARACTERS = 4 * 2**20  # one post's JSON; a real one is a few KB
_ASSIGNMENT = re.compile(r"\s*window\.YTD\.tweets\.part(\d+)\s*=", re.ASCII)
_SPACE = re.compile(r"\s*")


class _Text:
    """The decoded text of a chunked file, read as far as the parser needs; parsed text is dropped."""

    def __init__(self, chunks: Iterable[bytes], name: str):
        self._chunks, self._name = iter(chunks), name
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.ended = "", 0, False

    def fill(self, characters: int) -> bool:
        """Read until `characters` unparsed characters are at hand or the file ends; False if nothing more came."""
        before = len(self.text) - self.pos
        while len(self.text) - self.pos < characters and not self.ended:
            chunk = next(self._chunks, None)
            self.ended = chunk is None
            try:
                decoded = self._decoder.decode(chunk or b"", final=self.ended)
            except UnicodeDecodeError:
                raise MalformedInput(f"{self._name} is not UTF-8 text") from None
            self.text, self.pos = self.text[self.pos:] + decoded, 0
        return len(self.text) - self.pos > before

    def next_char(self) -> str:
        """The next character that is not whitespace ("" at the end), not consumed."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.fill(1):
                return self.text[self.pos:self.pos + 1]


def read_tweets_js(chunks: Iterable[bytes], name: str = "tweets.js") -> Iterator[Post]:
    """The posts of a tweets.js (`window.YTD.tweets.partN = [...]`) given as chunks of bytes."""
    text = _Text(chunks, name)
    text.fill(256)
    match = _ASSIGNMENT.match(text.text)
    if not match:
        raise MalformedInput(f"{name} does not start with 'window.YTD.tweets.partN =': is it an X archive's data/tweets.js?")
    text.pos = match.end()
    if text.next_char() != "[":
        raise MalformedInput(f"{name} holds no list of posts")
    text.pos += 1
    decoder, first = json.JSONDecoder(), True
    while True:
        char = text.next_char()
        if char == "]":
            text.pos += 1
            break
        if not first:
            if char != ",":
                raise MalformedInput(f"{name} is not valid archive JSON (expected ',' or ']')")
            text.pos += 1
            text.next_char()
        first = False
        while True:
            try:
                item, text.pos = decoder.raw_decode(text.text, text.pos)
                break
            except json.JSONDecodeError:
                # Most likely the entry goes on in the next chunk: read twice as much and try again.
                unparsed = len(text.text) - text.pos
                if unparsed >= MAX_ENTRY_CHARACTERS or not text.fill(2 * unparsed + 1):
                    raise MalformedInput(f"{name} is not valid archive JSON (an entry is broken or longer than "
                                         f"{MAX_ENTRY_CHARACTERS:,} characters)") from None
        yield _post(item, name)
    if text.next_char() == ";":
        text.pos += 1
    if text.next_char():
        raise MalformedInput(f"{name} is not valid archive JSON (text after the list of posts)")


def _post(item, name: str) -> Post:
    tweet = item.get("tweet", item) if isinstance(item, dict) else None
    if not isinstance(tweet, dict) or not isinstance(tweet.get("full_text"), str):
        raise MalformedInput(f"{name} has an entry without full_text")
    text = tweet["full_text"]
    # Archives carry no retweet flag: a retweet is the text X wrote for it.
    return Post(str(tweet.get("id_str") or tweet.get("id", "")), text, text.startswith("RT @"),
                str(tweet.get("created_at", "")))


def parse_tweets_js(content: str | bytes, name: str = "tweets.js") -> list[Post]:
    return list(read_tweets_js([content.encode() if isinstance(content, str) else content], name))


def _newest_first(post: Post) -> int:
    return int(post.id) if post.id.isdigit() else 0


class XArchiveSource:
    network = "X (archive)"

    def __init__(self, uri: str, stream, max_bytes: int = MAX_ARCHIVE_BYTES):
        """`stream(uri)` gives a file's bytes in chunks (`Storage.stream`)."""
        self.uri, self.stream, self.max_bytes = uri, stream, max_bytes

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        """`since` is not used: an archive is read whole (the scrape's merge drops the posts it knew)."""
        uri = self.uri.replace("{handle}", handle)
        # heapq.nlargest holds only `limit` posts at a time, and equals a stable sort's first `limit`.
        posts = heapq.nlargest(limit, self._posts(uri, ByteCap(self.max_bytes, f"{handle}'s X archive", "x_archive.MAX_ARCHIVE_BYTES")), key=_newest_first)
        return Timeline(handle, "", posts)

    def _posts(self, uri: str, cap: ByteCap) -> Iterator[Post]:
        try:
            chunks = self.stream(uri)
        except (FileNotFoundError, PermissionError):
            raise MissingInput(f"no X archive at {redact_url(uri)}, or these credentials may not read it") from None
        yield from read_tweets_js(cap.count(chunks), _file_name(uri))
        # Large archives split into tweets-part1.js, tweets-part2.js, ... beside tweets.js. Without the right
        # to list the bucket, S3 answers a missing one with 403, not 404: either ends the parts.
        if _file_name(uri) != "tweets.js":
            return
        for part in range(1, MAX_ARCHIVE_PARTS + 1):
            part_uri = _beside(uri, f"tweets-part{part}.js")
            try:
                chunks = self.stream(part_uri)
            except (FileNotFoundError, PermissionError):
                return
            yield from read_tweets_js(cap.count(chunks), f"tweets-part{part}.js")
        raise MalformedInput(f"the X archive at {redact_url(uri)} has more than {MAX_ARCHIVE_PARTS} parts "
                             "(x_archive.MAX_ARCHIVE_PARTS)")


def _file_name(uri: str) -> str:
    return redact_url(uri).rsplit("/", 1)[-1]


def _beside(uri: str, name: str) -> str:
    """The URI of `name` in the same folder as `uri`, its query (a signature, perhaps) kept."""
    path, question, query = uri.partition("?")
    return path.rsplit("/", 1)[0] + "/" + name + question + query
