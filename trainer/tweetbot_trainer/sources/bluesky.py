"""Bluesky's public AppView: app.bsky.feed.getAuthorFeed, reposts counted as retweets."""

from __future__ import annotations

from ..errors import PrivateAccount, StageError, UnknownHandle
from . import Pages, Post, Timeline
from .http import HttpClient, host_of

PAGE_SIZE = 100
REPOST = "app.bsky.feed.defs#reasonRepost"


class BlueskySource:
    network = "Bluesky"

    def __init__(self, app_view_url: str, **http_options):
        self.app_view_url = app_view_url.rstrip("/")
        self.http = HttpClient(**http_options)

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        """getAuthorFeed has no since: the feed is newest first, so paging stops at the post `since` names."""
        params = {"actor": handle, "limit": PAGE_SIZE}
        posts: list[Post] = []
        display_name = ""
        pages = Pages(f"{host_of(self.app_view_url)} for {handle}")
        known = False
        while len(posts) < limit:
            response = self.http.get(f"{self.app_view_url}/xrpc/app.bsky.feed.getAuthorFeed", params)
            if response.status_code == 400:
                error = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
                message = str(error.get("message", ""))[:200]  # the server's text, into the bot's status
                if error.get("error") in ("BlockedActor", "BlockedByActor") or "takedown" in message.lower():
                    raise PrivateAccount(f"{handle}'s feed is not visible on Bluesky ({error.get('error')})")
                raise UnknownHandle(f"{handle} does not exist on Bluesky ({message or 'invalid actor'})")
            if response.status_code != 200:
                raise StageError(f"the Bluesky AppView answered {response.status_code} for {handle}")
            page = response.json()
            for item in page.get("feed", []):
                post = item["post"]
                reposted = (item.get("reason") or {}).get("$type") == REPOST
                if not reposted and not display_name:
                    display_name = post.get("author", {}).get("displayName", "")
                # Only an original post ends the new ones: a repost carries the reposted post's URI, which
                # comes again when a person reposts their own post.
                if since and not reposted and post.get("uri") == since:
                    known = True
                    break
                record = post.get("record", {})
                posts.append(Post(post.get("uri", ""), record.get("text", ""), reposted, record.get("createdAt", "")))
            if known or not page.get("cursor") or not page.get("feed"):
                break
            pages.follow(len(page["feed"]), page["cursor"])
            params["cursor"] = page["cursor"]
        return Timeline(handle, display_name, posts[:limit])
