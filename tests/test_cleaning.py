"""huggingtweets' cleaning rules on concrete posts."""

from __future__ import annotations

import pytest

from tweetbot_trainer.cleaning import CleaningOptions, balance, clean_text, curate, fix_text, is_short
from tweetbot_trainer.sources import Post


def test_only_three_entities_are_unescaped():
    assert fix_text("Tom &amp; Jerry &lt;3 &gt;_&lt; &quot;hi&quot; &#39;") == "Tom & Jerry <3 >_< &quot;hi&quot; &#39;"
    # One level only: an escaped ampersand typed by the person stays one level escaped.
    assert fix_text("&amp;amp;") == "&amp;"


@pytest.mark.parametrize("raw, cleaned", [
    ("read this https://t.co/abc123 now", "read this now"),
    ("http://example.com/x?y=1 starts it", "starts it"),
    ("ends with a link\nhttps://t.co/x", "ends with a link"),
    ("two  spaces\tand\ttabs\n\nand lines ", "two spaces and tabs and lines"),
    ("@friend replies stay #and hashtags", "@friend replies stay #and hashtags"),
    ("https://a.b/c https://d.e/f", ""),
    ("see:https://t.co/x glued", "see: glued"),
])
def test_links_go_and_whitespace_collapses(raw, cleaned):
    assert clean_text(raw) == cleaned


@pytest.mark.parametrize("text, short", [
    ("", True),
    ("hello", True),
    ("hello world", True),
    ("hello big world", False),
    ("@a @b #c hello world", True),  # only 2 words free of @, # and http
    ("@a hello big world", False),
    ("emails@count as #tagged too", True),  # 'emails@count' and '#tagged' do not count
])
def test_short_means_fewer_than_three_plain_words(text, short):
    assert is_short(text) is short


def test_a_timeline_is_counted_once_and_the_identity_holds():
    posts = [
        Post("9", "RT @someone: retweeted words here", True),
        Post("8", "a proper post with words", False),
        Post("7", "@friend thanks a lot!", False),  # a reply: kept
        Post("6", "lol", False),  # short
        Post("5", "https://t.co/only-a-link", False),  # nothing left: short
        Post("4", "QT this is my take https://t.co/q", False),  # a quote: kept without the link
        Post("3", "RT @other: another retweet", True),
    ]
    curated = curate("alice", posts, display_name="Alice")
    stats = curated.stats
    assert (stats.downloaded, stats.retweets, stats.short, stats.kept) == (7, 2, 2, 3)
    assert stats.downloaded == stats.retweets + stats.short + stats.kept
    assert curated.kept == [("8", "a proper post with words"), ("7", "@friend thanks a lot!"), ("4", "QT this is my take")]


def test_the_seed_cards_shape_256_4_42_210():
    """001_f6dac7efa3681cca: 256 downloaded = 4 retweets + 42 short + 210 kept."""
    posts = ([Post(f"r{i}", f"RT @x: retweet number {i}", True) for i in range(4)]
             + [Post(f"s{i}", f"short {i}" if i % 2 else "#tag @someone ok", False) for i in range(42)]
             + [Post(f"k{i}", f"this is kept post number {i}", False) for i in range(210)])
    stats = curate("seed", posts).stats
    assert (stats.downloaded, stats.retweets, stats.short, stats.kept) == (256, 4, 42, 210)


def test_options_can_keep_retweets_and_drop_replies():
    posts = [Post("1", "RT @x: retweet with enough words", True), Post("2", "@x a reply with words", False),
             Post("3", "an ordinary post here", False)]
    stats = curate("a", posts, CleaningOptions(drop_retweets=False, keep_replies=False)).stats
    assert (stats.retweets, stats.short, stats.kept) == (0, 1, 2)


def test_dedupe_and_min_words():
    posts = [Post("1", "same words again here", False), Post("2", "same  words again here https://t.co/x", False),
             Post("3", "two words", False)]
    stats = curate("a", posts, CleaningOptions(dedupe=True, min_words=2)).stats
    assert (stats.short, stats.kept) == (1, 2)
    assert CleaningOptions.from_spec({"dedupe": True, "minWords": 5}) == CleaningOptions(dedupe=True, min_words=5)


def test_balancing_oversamples_smaller_handles_to_the_largest_size_reproducibly():
    big = curate("big", [Post(str(i), f"a long post with many words number {i}", False) for i in range(100)])
    small = curate("small", [Post(str(i), f"tiny post {i} here", False) for i in range(5)])
    first = balance({"big": big, "small": small}, seed=7)
    assert first == balance({"big": big, "small": small}, seed=7)
    assert sorted(first["big"]) == sorted(big.kept)  # shuffled, never padded
    small_chars = sum(len(text) for _, text in first["small"])
    assert big.characters <= small_chars < big.characters + max(len(t) for _, t in small.kept)
    assert set(first["small"]) == set(small.kept)
