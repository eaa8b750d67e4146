"""The data/tweets.js file of the archive a person downloads from X: every post, no 3,200 cap."""

from __future__ import annotations

import json
import re

from ..errors import MalformedInput, StageError
from . import Post, Timeline

_ASSIGNMENT = re.compile(r"^\s*window\.YTD\.tweets\.part(\d+)\s*=\s*", re.ASCII)


def parse_tweets_js(content: str, name: str = "tweets.js") -> list[Post]:
    match = _ASSIGNMENT.match(content)
    if not match:
        raise MalformedInput(f"{name} does not start with 'window.YTD.tweets.partN =': is it an X archive's data/tweets.js?")
    try:
        items = json.loads(content[match.end():].rstrip().rstrip(";"))
    except json.JSONDecodeError as error:
        raise MalformedInput(f"{name} is not valid archive JSON (line {error.lineno}, column {error.colno})") from None
    if not isinstance(items, list):
        raise MalformedInput(f"{name} holds no list of posts")
    posts = []
    for item in items:
        tweet = item.get("tweet", item) if isinstance(item, dict) else None
        if not isinstance(tweet, dict) or "full_text" not in tweet:
            raise MalformedInput(f"{name} has an entry without full_text")
        text = tweet["full_text"]
        # Archives carry no retweet flag: a retweet is the text X wrote for it.
        posts.append(Post(str(tweet.get("id_str") or tweet.get("id", "")), text, text.startswith("RT @"),
                          tweet.get("created_at", "")))
    return posts


class XArchiveSource:
    network = "X (archive)"

    def __init__(self, uri: str, read):
        self.uri, self.read = uri, read

    def fetch(self, handle: str, limit: int) -> Timeline:
        uri = self.uri.replace("{handle}", handle)
        posts = parse_tweets_js(self.read(uri).decode("utf-8-sig"), uri.rsplit("/", 1)[-1])
        # Large archives split into tweets-part1.js, tweets-part2.js, ... beside tweets.js.
        if uri.endswith("/tweets.js"):
            part = 1
            while True:
                try:
                    content = self.read(uri[: -len("tweets.js")] + f"tweets-part{part}.js")
                except FileNotFoundError:
                    break
                except StageError:
                    break
                posts += parse_tweets_js(content.decode("utf-8-sig"), f"tweets-part{part}.js")
                part += 1
        posts.sort(key=lambda post: int(post.id) if post.id.isdigit() else 0, reverse=True)  # newest first
        return Timeline(handle, "", posts[:limit])
