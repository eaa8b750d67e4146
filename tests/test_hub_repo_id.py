"""The default Hub repository of a bot: `<token owner>/<handles>`, made a name the Hub accepts."""

from __future__ import annotations

import re

import pytest
from huggingface_hub.utils import validate_repo_id

from tweetbot_trainer.hub import MAX_REPO_ID, default_repo_id

# The Hub's rules: ASCII letters, digits, '-', '_', '.'; no '--' or '..'; no '-' or '.' at either end.
NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")


def valid(repo_id: str) -> bool:
    owner, name = repo_id.split("/")
    validate_repo_id(repo_id)  # huggingface_hub's own check, raising on a bad id
    return (len(repo_id) <= MAX_REPO_ID and bool(NAME.fullmatch(name)) and "--" not in name and ".." not in name
            and not name.endswith(".git"))


@pytest.mark.parametrize("handles, expected", [
    (["turtlebreezee", "purefulsoul"], "alice/purefulsoul-turtlebreezee"),  # sorted, as huggingtweets named them
    (["gargron@mastodon.social"], "alice/gargron-at-mastodon.social"),
    (["@gargron@mastodon.social"], "alice/gargron-at-mastodon.social"),
    (["jay.bsky.team"], "alice/jay.bsky.team"),
    (["-a-", ".b."], "alice/a-b"),
    (["a..b", "c--d", "e.-f"], "alice/a-b-c-d-e-f"),
    (["x/y z", "ü"], "alice/x-y-z"),
    (["repo.git"], "alice/repo-git"),
])
def test_handles_become_a_valid_repo_name(handles, expected):
    assert default_repo_id("alice", handles) == expected
    assert valid(expected)


def test_long_and_empty_names_stay_valid_and_distinct():
    first = default_repo_id("alice", ["a" * 60 + "@mastodon.social", "b" * 60, "c" * 60])
    second = default_repo_id("alice", ["a" * 60 + "@mastodon.social", "b" * 60, "c" * 59])
    assert valid(first) and valid(second) and first != second
    assert len(first) == MAX_REPO_ID
    only_emoji = default_repo_id("alice", ["🍂"])
    assert valid(only_emoji) and only_emoji != default_repo_id("alice", ["🐢"])
