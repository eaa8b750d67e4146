"""Post sources behind one interface: `open_source(request_source, storage, environ).fetch(handle, limit, since)`."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from ..contract import SOURCES, section_defaults
from ..errors import MalformedInput, StageError

# X's own limit. Each name travels in the 4 KiB termination message and onto the public model card.
MAX_DISPLAY_NAME = 50
# Bidi embeddings, overrides, isolates and marks: they make a name display as other text.
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_display_name(raw: str) -> str:
    """A display name as a person chose it, made one line of at most MAX_DISPLAY_NAME characters: control
    characters and bidi controls go, any whitespace becomes one space; the joiners inside emoji stay."""
    kept = "".join(char for char in str(raw)
                   if char not in _BIDI_CONTROLS and (char.isspace() or unicodedata.category(char) != "Cc"))
    name = " ".join(kept.split())  # newlines, tabs, line and paragraph separators: one space
    return name if len(name) <= MAX_DISPLAY_NAME else name[: MAX_DISPLAY_NAME - 1].rstrip() + "…"


class ByteCap:
    """Counts the bytes read of one input, over one stream or several (an archive's parts), and stops at
    `cap`; the message names the input and the setting (`where`) that holds the cap."""

    def __init__(self, cap: int, what: str, where: str):
        self.cap, self.what, self.where, self.read = cap, what, where, 0

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.read += len(chunk)
            if self.read > self.cap:
                raise MalformedInput(
                    f"{self.what} is larger than {self.cap:,} bytes, the most a scrape reads ({self.where})")
            yield chunk


@dataclass(frozen=True)
class Post:
    id: str
    text: str  # as the source gives it: HTML entities still escaped where the source escapes them
    is_repost: bool
    created_at: str = ""


@dataclass
class Timeline:
    handle: str
    display_name: str  # bounded by clean_display_name, whatever the network sent
    posts: list[Post]

    def __post_init__(self):
        self.display_name = clean_display_name(self.display_name)


MAX_EMPTY_PAGES = 5  # pages in a row that point on but hold no posts
MAX_PAGES = 30_000  # one handle's pages: the CRD's most, 1,000,000 posts, is 25,000 Mastodon pages of 40


class Pages:
    """Bounds one timeline's paging loop, whatever the server answers: a cursor is never followed twice,
    nor past MAX_EMPTY_PAGES pages in a row without posts, nor past MAX_PAGES pages."""

    def __init__(self, what: str):
        self.what = what  # "the X API for @alice": the start of each error
        self.pages = self.empty = 0
        self.cursors: set[str] = set()

    def follow(self, posts: int, cursor: str) -> None:
        """A page of `posts` posts pointing on to `cursor`; StageError if following it could never end."""
        self.pages += 1
        self.empty = 0 if posts else self.empty + 1
        if cursor in self.cursors:
            raise StageError(f"{self.what} returned the same cursor twice: its timeline would never end")
        if self.empty >= MAX_EMPTY_PAGES:
            raise StageError(f"{self.what} returned {self.empty} pages in a row without posts, each pointing on to another")
        if self.pages >= MAX_PAGES:
            raise StageError(f"{self.what} returned more than {MAX_PAGES} pages")
        self.cursors.add(cursor)


class Source(Protocol):
    network: str

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        """The handle's newest `limit` posts, newest first. `since`: the id of a post fetched before, a hint
        that the posts from it on are known; a source may leave them out (each network as its API allows),
        but never returns fewer posts newer than it because of it."""


def _x_api(settings: dict, storage, env: Mapping[str, str]) -> Source:
    from ..errors import AuthenticationFailed
    from .x_api import XApiSource

    secret = SOURCES["x"]
    token = env.get(secret.env, "")
    if not token:
        raise AuthenticationFailed(f"no X API bearer token: {secret.env} is empty (check spec.source.x.{secret.field})")
    return XApiSource(settings["apiUrl"], token)


def _x_archive(settings: dict, storage, env: Mapping[str, str]) -> Source:
    from .x_archive import XArchiveSource

    return XArchiveSource(settings["uri"], storage.stream)


def _mastodon(settings: dict, storage, env: Mapping[str, str]) -> Source:
    from .mastodon import MastodonSource

    return MastodonSource(settings["instanceUrl"], env.get(SOURCES["mastodon"].env, ""))


def _bluesky(settings: dict, storage, env: Mapping[str, str]) -> Source:
    from .bluesky import BlueskySource

    return BlueskySource(settings["appViewUrl"])


def _file(settings: dict, storage, env: Mapping[str, str]) -> Source:
    from .files import FileSource

    return FileSource(settings["uri"], storage.stream)


# The client of each source in `contract.SOURCES`, by its spec.source key, tried in this order. Each builder
# imports its client when called: the clients import Post, Timeline and Pages from this package.
CLIENTS: dict[str, Callable[[dict, Any, Mapping[str, str]], Source]] = {
    "x": _x_api,
    "xArchive": _x_archive,
    "mastodon": _mastodon,
    "bluesky": _bluesky,
    "file": _file,
}


def open_source(source: dict, storage, environ: Mapping[str, str] | None = None) -> Source:
    """The client for a TweetBot's `spec.source` (as passed in the stage request), its defaults filled in;
    `storage` (a `Storage`) reads archive and post files from S3 or a URL."""
    settings = section_defaults("source", source)
    env = os.environ if environ is None else environ
    for key, client in CLIENTS.items():
        if key in settings:
            return client(settings[key], storage, env)
    keys = list(CLIENTS)
    raise MalformedInput(f"no known source in {sorted(source)}: expected {', '.join(keys[:-1])} or {keys[-1]}")
