"""The scrape stage: each handle's posts -> cleaned, counted dataset in S3 (private: raw posts never leave it).

Every run also keeps the raw posts it fetched (`S3Layout.posts`). A scheduled run that extends an earlier one
(`StageRequest.extends_run`) fetches only what is newer than those, as far as its source allows, and cleans the
merged posts as a full scrape would: its dataset and counts are the ones a full scrape would make now.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from datetime import datetime, timezone

from .cleaning import MIN_CHARACTERS, WARN_CHARACTERS, CleaningOptions, CuratedHandle, balance, curate
from .contract import S3Layout, StageRequest, StageResult, section_defaults
from .errors import EmptyTimeline, NotEnoughText
from .sources import ByteCap, Post, open_source
from .sources.files import post_of_row, read_posts_file
from .storage import Storage

log = logging.getLogger("tweetbot.scrape")

# An earlier run's posts.jsonl is our own file, but its read is bounded still: this many bytes a post on average
# (most are a few hundred; an X long post can reach 100 KB) times the posts it can hold.
POSTS_FILE_BYTES_PER_POST = 16 * 1024


def merge_posts(new: list[Post], previous: list[Post], limit: int) -> tuple[list[Post], set[str]]:
    """One handle's posts for a run that extends an earlier one: the fetched posts whose id the earlier run did
    not have (newer: sources fetch newest first), then the earlier run's, the newest `limit` kept; and the ids of
    the new ones kept. Posts are not deduplicated within either list, so an unchanged timeline merges to itself."""
    known = {post.id for post in previous}
    merged = ([post for post in new if post.id not in known] + previous)[:limit]
    return merged, {post.id for post in merged if post.id not in known}


def since_hint(previous: list[Post]) -> str:
    """The newest original post's id: on Bluesky a repost carries the reposted post's id, which can come again,
    so a source may not trust a repost's to end the new posts (an older hint only fetches more)."""
    return next((post.id for post in previous if not post.is_repost), "")


def read_previous_posts(storage: Storage, layout: S3Layout, handles: list[str], limit: int) -> dict[str, list[Post]] | None:
    """Each handle's posts from the run `layout` names, newest first, or None if it has no complete posts.jsonl
    (a run from before it was written, or one whose scrape never finished)."""
    manifest_uri, uri = f"s3://{layout.bucket}/{scrape_manifest(layout)}", f"s3://{layout.bucket}/{layout.posts}"
    try:
        if layout.posts not in json.loads(storage.read(manifest_uri)).get("files", {}):
            return None
        chunks = storage.stream(uri)
    except (FileNotFoundError, PermissionError):
        return None
    posts: dict[str, list[Post]] = {handle: [] for handle in handles}
    cap = ByteCap(POSTS_FILE_BYTES_PER_POST * limit * max(1, len(handles)), uri, "scrape.POSTS_FILE_BYTES_PER_POST")
    for number, row in enumerate(read_posts_file(cap.count(chunks), "posts.jsonl")):
        kept = posts.get(str(row.get("handle")))
        if kept is not None and len(kept) < limit:
            kept.append(post_of_row(row, number))
    return posts


def posts_file(timelines: dict[str, list[Post]]) -> bytes:
    return "".join(json.dumps({"handle": handle, **asdict(post)}, ensure_ascii=False) + "\n"
                   for handle, posts in timelines.items() for post in posts).encode()


def run_scrape(request: StageRequest, storage: Storage, environ: dict[str, str] | None = None) -> StageResult:
    environ = os.environ if environ is None else environ
    source = open_source(request.source, storage, environ)
    options = CleaningOptions.from_spec(request.data)
    limit = int(section_defaults("source", request.source)["maxPostsPerHandle"])

    layout = request.s3
    previous = None
    if request.extends_run:
        previous = read_previous_posts(storage, layout.of_run(request.extends_run), request.handles, limit)
        if previous is None:
            log.warning("the earlier run %s has no posts.jsonl: scraping every post again", request.extends_run)

    curated: dict[str, CuratedHandle] = {}
    raw: dict[str, list[Post]] = {}
    new_ids: dict[str, set[str]] = {}
    for handle in sorted(request.handles):  # as huggingtweets: lower-cased and sorted
        known = (previous or {}).get(handle, [])
        timeline = source.fetch(handle, limit, since=since_hint(known))
        raw[handle], new_ids[handle] = merge_posts(timeline.posts, known, limit)
        if not raw[handle]:
            raise EmptyTimeline(f"{handle} has no posts on {source.network}")
        # Cleaned after the merge, as a full scrape would clean them: the counts describe the whole dataset.
        curated[handle] = curate(handle, raw[handle], options, timeline.display_name)
        log.info("%s: %s, %d new", handle, curated[handle].stats, len(new_ids[handle]))

    for handle, c in curated.items():
        if c.joined_length < MIN_CHARACTERS:
            raise NotEnoughText(
                f"{handle} has only {c.joined_length} characters of text after cleaning ({c.stats.kept} of "
                f"{c.stats.downloaded} posts kept); at least {MIN_CHARACTERS} are needed to fine-tune"
            )
        if c.joined_length < WARN_CHARACTERS:
            log.warning("%s has only %d characters of text: under %d the bot will mostly repeat its posts",
                        handle, c.joined_length, WARN_CHARACTERS)
    characters = sum(c.characters for c in curated.values())

    seed = int(section_defaults("training", request.training)["seed"])
    balanced = bool(section_defaults("data", request.data)["balanceHandles"]) and len(curated) > 1
    texts = balance(curated, seed) if balanced else {handle: c.kept for handle, c in curated.items()}
    if balanced:
        log.info("balanced handles by character count with seed %d", seed)

    dataset = "".join(
        json.dumps({"handle": handle, "id": post_id, "text": text}, ensure_ascii=False) + "\n"
        for handle, posts in texts.items()
        for post_id, text in posts
    ).encode()
    stats = {
        "network": source.network,
        "collectedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "handles": [vars(c.stats) for c in curated.values()],
        "characters": characters,
        "balanced": balanced,
        "seed": seed,
    }
    storage.write_all(
        layout.bucket,
        {layout.dataset: dataset, layout.stats: json.dumps(stats, indent=1, ensure_ascii=False).encode(),
         layout.posts: posts_file(raw)},
        manifest_key=scrape_manifest(layout),
    )
    # The kept posts the earlier run did not have (all of them for a full scrape), each once: balancing's
    # repeats would make a few new posts reach the operator's schedule.minNewPosts.
    new_posts = sum(post_id in new_ids[handle] for handle, c in curated.items() for post_id, _ in c.kept)
    return StageResult(
        stage="scrape",
        run_id=request.run_id,
        data=[c.stats for c in curated.values()],
        metrics={"characters": characters, "posts": sum(len(posts) for posts in texts.values()), "newPosts": new_posts},
        artifacts={"datasetUri": layout.uri("data", "dataset.jsonl")},
    )


def scrape_manifest(layout: S3Layout) -> str:
    return layout.key("data", "manifest.json")
