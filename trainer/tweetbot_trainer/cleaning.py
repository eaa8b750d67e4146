"""Posts -> training text, by huggingtweets' rules, so a card's numbers mean what huggingtweets' meant.

Per handle: retweets are dropped and counted; `&amp;`, `&lt;` and `&gt;` (only those) are unescaped;
words starting with `http:` or `https:` are removed; whitespace collapses to single spaces; a post with
fewer than 3 words free of `http`, `@` and `#` is "short", dropped and counted. Replies and quotes stay.
The counts come from one pass over immutable posts, so downloaded = retweets + short + kept always holds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .contract import HandleStats, section_defaults
from .sources import Post

# Per handle, on its kept posts joined with <|endoftext|>, as huggingtweets checked.
MIN_CHARACTERS = 6_000  # below this the stage fails: too little text to fine-tune on
WARN_CHARACTERS = 40_000  # below this the stage warns: the bot will mostly parrot
SEPARATOR = "<|endoftext|>"

_URL = re.compile(r"https?:\S+")
_BORING_MARKERS = ("http", "@", "#")
_DATA = section_defaults("data", None)


@dataclass(frozen=True)
class CleaningOptions:
    """spec.data's cleaning rules, with the spec's defaults."""

    drop_retweets: bool = _DATA["dropRetweets"]
    drop_short: bool = _DATA["dropShortPosts"]
    keep_replies: bool = _DATA["keepReplies"]
    dedupe: bool = _DATA["dedupe"]
    min_words: int = _DATA["minWords"]

    @classmethod
    def from_spec(cls, data: dict) -> CleaningOptions:
        data = section_defaults("data", data)
        return cls(drop_retweets=data["dropRetweets"], drop_short=data["dropShortPosts"], keep_replies=data["keepReplies"],
                   dedupe=data["dedupe"], min_words=data["minWords"])


def fix_text(text: str) -> str:
    """huggingtweets unescapes just these three entities (the ones X escapes in post text)."""
    return text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")


def clean_text(text: str) -> str:
    return " ".join(_URL.sub("", fix_text(text)).split())


def is_short(cleaned: str, min_words: int = _DATA["minWords"]) -> bool:
    """Fewer than `min_words` words that contain none of http, @ and # (huggingtweets' "boring" test)."""
    plain_words = sum(1 for word in cleaned.split() if not any(marker in word.lower() for marker in _BORING_MARKERS))
    return plain_words < min_words


def is_reply(text: str) -> bool:
    return text.lstrip().startswith("@")


@dataclass(frozen=True)
class CuratedHandle:
    stats: HandleStats
    kept: list[tuple[str, str]]  # (post id, cleaned text), newest first

    @property
    def characters(self) -> int:
        return sum(len(text) for _, text in self.kept)

    @property
    def joined_length(self) -> int:
        return self.characters + len(SEPARATOR) * max(0, len(self.kept) - 1)


def curate(handle: str, posts: list[Post], options: CleaningOptions = CleaningOptions(), display_name: str = "") -> CuratedHandle:
    retweets = short = 0
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for post in posts:
        if post.is_repost and options.drop_retweets:
            retweets += 1
            continue
        cleaned = clean_text(post.text)
        # Posts the optional rules drop (replies, repeats) count as short, so the card's identity holds.
        if (
            not cleaned
            or (options.drop_short and is_short(cleaned, options.min_words))
            or (not options.keep_replies and is_reply(cleaned))
            or (options.dedupe and cleaned in seen)
        ):
            short += 1
            continue
        seen.add(cleaned)
        kept.append((post.id, cleaned))
    stats = HandleStats(handle, len(posts), retweets, short, len(kept), display_name)
    return CuratedHandle(stats, kept)


def balance(curated: dict[str, CuratedHandle], seed: int) -> dict[str, list[tuple[str, str]]]:
    """huggingtweets' oversampling: shuffle each handle's posts, then cycle through them again until the
    handle has at least the largest handle's character count (separators not counted)."""
    target = max(handle.characters for handle in curated.values())
    rng = random.Random(seed)
    balanced = {}
    for name, handle in curated.items():
        posts = list(handle.kept)
        rng.shuffle(posts)
        characters, original = handle.characters, list(posts)
        while original and characters < target:
            for post in original:
                posts.append(post)
                characters += len(post[1])
                if characters >= target:
                    break
        balanced[name] = posts
    return balanced
