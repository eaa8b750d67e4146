"""The scrape stage: each handle's posts -> cleaned, counted dataset in S3 (private: raw posts never leave it)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

from .cleaning import MIN_CHARACTERS, WARN_CHARACTERS, CleaningOptions, CuratedHandle, balance, curate
from .contract import S3Layout, StageRequest, StageResult, section_defaults
from .errors import EmptyTimeline, NotEnoughText
from .sources import open_source
from .storage import Storage

log = logging.getLogger("tweetbot.scrape")


def run_scrape(request: StageRequest, storage: Storage, environ: dict[str, str] | None = None) -> StageResult:
    environ = os.environ if environ is None else environ
    source = open_source(request.source, storage, environ)
    options = CleaningOptions.from_spec(request.data)
    limit = int(section_defaults("source", request.source)["maxPostsPerHandle"])

    curated: dict[str, CuratedHandle] = {}
    for handle in sorted(request.handles):  # as huggingtweets: lower-cased and sorted
        timeline = source.fetch(handle, limit)
        if not timeline.posts:
            raise EmptyTimeline(f"{handle} has no posts on {source.network}")
        curated[handle] = curate(handle, timeline.posts, options, timeline.display_name)
        log.info("%s: %s", handle, curated[handle].stats)

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
    layout = request.s3
    storage.write_all(
        layout.bucket,
        {layout.dataset: dataset, layout.stats: json.dumps(stats, indent=1, ensure_ascii=False).encode()},
        manifest_key=scrape_manifest(layout),
    )
    return StageResult(
        stage="scrape",
        run_id=request.run_id,
        data=[c.stats for c in curated.values()],
        metrics={"characters": characters, "posts": sum(len(posts) for posts in texts.values())},
        artifacts={"datasetUri": layout.uri("data", "dataset.jsonl")},
    )


def scrape_manifest(layout: S3Layout) -> str:
    return layout.key("data", "manifest.json")
