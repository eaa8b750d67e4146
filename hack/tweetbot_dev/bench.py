"""Benchmarks (`tweetbot-dev bench ...`), never tests: every figure is printed beside a baseline measured in
the same run on the same machine, as a ratio."""

from __future__ import annotations

import json
import os
import re
import time

import requests

from tweetbot_trainer.cleaning import curate
from tweetbot_trainer.sources import Post
from tweetbot_trainer.sources.x_api import XApiSource

from .fakes import FakeAccount, FakePost, FakeSocialServer


def _huggingtweets_clean(tweet: str) -> str:
    """The baseline: huggingtweets' per-tweet cleaning as its notebook wrote it (five regex passes per
    link prefix with patterns built on every call, then a split/join)."""
    tweet = tweet.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    for prefix in ("http:", "https:"):
        tweet = re.sub(f" {prefix}\\S+", "", tweet)
        tweet = re.sub(f"{prefix}\\S+ ", "", tweet)
        tweet = re.sub(f"\n{prefix}\\S+ ", "", tweet)
        tweet = re.sub(f"\n{prefix}\\S+", "", tweet)
        tweet = re.sub(f"{prefix}\\S+", "", tweet)
    tweet = re.sub(" +", " ", tweet)
    return " ".join(tweet.split()).strip()


def _huggingtweets_boring(tweet: str) -> bool:
    return len([None for w in tweet.split() if all(bs not in w.lower() for bs in ("http", "@", "#"))]) < 3


def _sample_posts(count: int) -> list[Post]:
    words = "my dream is to build a small robot that writes posts about cats and coffee every morning".split()
    posts = []
    for i in range(count):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range(5 + i % 20))
        if i % 5 == 0:
            text += f" https://t.co/{i:08x}"
        if i % 11 == 0:
            text = "@friend " + text + " &amp; #tag"
        posts.append(Post(str(i), "RT @x: " + text if i % 13 == 0 else text, i % 13 == 0))
    return posts


def _best_of(runs: int, work) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def bench_scrape(posts: int = 100_000, fetch_posts: int = 3200, runs: int = 3) -> dict:
    sample = _sample_posts(posts)

    def ours():
        curate("bench", sample)

    def baseline():
        kept = [t for t in (p.text for p in sample) if not t.startswith("RT @")]
        [t for t in (_huggingtweets_clean(t) for t in kept) if not _huggingtweets_boring(t)]

    ours_s, baseline_s = _best_of(runs, ours), _best_of(runs, baseline)

    account = FakeAccount("bench", "Bench", [FakePost(10**6 - i, f"post {i} with a few words") for i in range(fetch_posts)])
    with FakeSocialServer({"bench": account}) as server:
        def client_fetch():
            assert len(XApiSource(server.url, server.x_bearer_token).fetch("bench", fetch_posts).posts) == fetch_posts

        def raw_fetch():
            # The floor: the same 32 page requests with a bare requests.Session and no parsing into posts.
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {server.x_bearer_token}"
            session.get(f"{server.url}/2/users/by/username/bench").json()
            token = None
            while True:
                params = {"max_results": 100, **({"pagination_token": token} if token else {})}
                token = session.get(f"{server.url}/2/users/1000/tweets", params=params).json()["meta"].get("next_token")
                if not token:
                    break

        fetch_s, raw_s = _best_of(runs, client_fetch), _best_of(runs, raw_fetch)

    return {
        "cleaning": {"posts": posts, "posts_per_second": round(posts / ours_s),
                     "baseline_posts_per_second": round(posts / baseline_s), "speedup": round(baseline_s / ours_s, 2)},
        "fetch_3200": {"posts": fetch_posts, "seconds": round(fetch_s, 3), "baseline_seconds": round(raw_s, 3),
                       "overhead_ratio": round(fetch_s / raw_s, 2)},
    }


def scrape_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    cleaning, fetch = results["cleaning"], results["fetch_3200"]
    return [
        ("cleaning (posts/s)", f"{cleaning['posts_per_second']:,}", f"{cleaning['baseline_posts_per_second']:,}",
         f"{cleaning['speedup']}x faster", "huggingtweets' clean_tweet + boring_tweet"),
        ("fetch 3,200 posts (s)", f"{fetch['seconds']}", f"{fetch['baseline_seconds']}",
         f"{fetch['overhead_ratio']}x the floor", "bare requests.Session over the same pages"),
    ]


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    print(f"{'benchmark':30} {'ours':>12} {'baseline':>12}  {'ratio':20} baseline is")
    for row in rows:
        print(f"{row[0]:30} {row[1]:>12} {row[2]:>12}  {row[3]:20} {row[4]}")


def markdown_table(results: dict, rows: list[tuple[str, str, str, str, str]]) -> str:
    """The table as docs/benchmarks.md carries it."""
    lines = [f"`tweetbot-dev bench`, {results['date']}, {results['machine']}, {results['seconds']} s in all.", "",
             "| benchmark | ours | baseline | ratio | baseline is |", "| --- | ---: | ---: | --- | --- |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv_json: str | None = None, only: tuple[str, ...] = (), markdown: str | None = None) -> dict:
    """Every benchmark (or those named in `only`: scrape, train, s3, operator); prints the table and writes
    the results as JSON and the table as Markdown."""
    import platform
    from datetime import datetime, timezone

    from .bench_operator import bench_operator, operator_rows
    from .bench_trainer import bench_s3_upload, bench_train, rows as trainer_rows

    started = time.monotonic()
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                     "machine": f"{os.cpu_count()} cores, {_memory_gb()} GB, {platform.machine()}, Python {platform.python_version()}"}
    wanted = set(only or ("scrape", "train", "s3", "operator"))
    if "scrape" in wanted:
        results["scrape"] = bench_scrape()
    if "train" in wanted:
        results["train"] = bench_train()
    if "s3" in wanted:
        results["s3_upload"] = bench_s3_upload()
    if "operator" in wanted:
        results["operator"] = bench_operator()
    results["seconds"] = round(time.monotonic() - started)
    rows = scrape_rows(results["scrape"]) if "scrape" in results else []
    rows += trainer_rows(results) + (operator_rows(results["operator"]) if "operator" in results else [])
    print(f"tweetbot-dev bench, {results['date']}, {results['machine']}, {results['seconds']} s")
    print_table(rows)
    if argv_json:
        with open(argv_json, "w") as file:
            json.dump(results, file, indent=1)
    if markdown:
        with open(markdown, "w") as file:
            file.write(markdown_table(results, rows))
    return results


def _memory_gb() -> int:
    with open("/proc/meminfo") as meminfo:
        return round(int(meminfo.readline().split()[1]) / 1024 / 1024)
