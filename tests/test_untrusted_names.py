"""Names the scraped people set themselves: bounded where they enter, and never able to break a result."""

from __future__ import annotations

import pytest

from tweetbot_dev.fakes import FakeAccount, FakePost, FakeSocialServer
from tweetbot_trainer.cli import termination_message
from tweetbot_trainer.contract import TERMINATION_MESSAGE_LIMIT, HandleStats, StageResult
from tweetbot_trainer.sources import MAX_DISPLAY_NAME, Timeline, clean_display_name
from tweetbot_trainer.sources.bluesky import BlueskySource
from tweetbot_trainer.sources.mastodon import MastodonSource
from tweetbot_trainer.sources.x_api import XApiSource

LONG = "🤖" * 10_000


@pytest.mark.parametrize("raw, cleaned", [
    ("Liza Soberano", "Liza Soberano"),
    ("  two\nlines\r\n\tand tabs ", "two lines and tabs"),
    ("bell\x07 nul\x00 del\x7f", "bell nul del"),
    ("\u202eevil\u202c name\u2066x\u2069", "evil namex"),  # bidi overrides and isolates
    ("para\u2029graph\u2028line", "para graph line"),
    ("👩\u200d💻 coder", "👩\u200d💻 coder"),  # the joiner inside an emoji stays
    ("a" * 51, "a" * (MAX_DISPLAY_NAME - 1) + "…"),
    ("a" * MAX_DISPLAY_NAME, "a" * MAX_DISPLAY_NAME),
])
def test_display_names_are_one_bounded_line(raw, cleaned):
    assert clean_display_name(raw) == cleaned
    assert len(Timeline("h", raw, []).display_name) <= MAX_DISPLAY_NAME


def test_every_network_bounds_the_display_name_it_reads():
    with FakeSocialServer({"alice": FakeAccount("alice", LONG + "\n# x", [FakePost(1, "a post")])}) as server:
        for source in (XApiSource(server.url, server.x_bearer_token), MastodonSource(server.url), BlueskySource(server.url)):
            assert source.fetch("alice", 10).display_name == "🤖" * (MAX_DISPLAY_NAME - 1) + "…", source.network


def test_a_result_always_fits_the_termination_message():
    stats = [HandleStats(f"h{i}", 10, 1, 2, 7, LONG) for i in range(3)]
    result = StageResult(stage="scrape", run_id="r", data=stats, metrics={"characters": 1.0},
                         artifacts={"datasetUri": "s3://b/" + "k" * 200})
    message = termination_message(result)
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = StageResult.from_termination_message(message)
    assert [(s.handle, s.kept) for s in back.data] == [(s.handle, s.kept) for s in stats]
    assert back.artifacts == result.artifacts and back.ok

    for error in ("StageFailed: " + "e" * 10_000, "UnknownHandle: " + LONG):  # a server's message can be any text
        failed = StageResult(stage="scrape", run_id="", ok=False, error=error)
        back = StageResult.from_termination_message(termination_message(failed))
        assert not back.ok and back.error.startswith(error[:20]) and len(back.error) < 4096

    small = StageResult(stage="scrape", run_id="r", data=[HandleStats("a", 1, 0, 0, 1, "Alice")])
    assert termination_message(small) == small.to_termination_message()  # untouched when it fits
