"""Mastodon's public API: an account's statuses, boosts counted as retweets, HTML turned into text."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

from ..errors import AuthenticationFailed, PrivateAccount, StageError, UnknownHandle, redact_url
from . import Pages, Post, Timeline
from .http import HttpClient

PAGE_SIZE = 40


class _Text(HTMLParser):
    """Status HTML to plain text: paragraphs and line breaks become newlines; links keep their text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "br":
            self.parts.append("\n")
        elif tag == "p" and self.parts:
            self.parts.append("\n\n")

    def handle_data(self, data):
        self.parts.append(data)


def html_to_text(content: str) -> str:
    parser = _Text()
    parser.feed(content)
    parser.close()
    # Back to the entity form huggingtweets' cleaning expects for &, < and >.
    return html.escape("".join(parser.parts), quote=False)


_NEXT_MAX_ID = re.compile(r"<[^>]*[?&]max_id=(\w+)[^>]*>;\s*rel=\"next\"")


class MastodonSource:
    network = "Mastodon"

    def __init__(self, instance_url: str, access_token: str = "", **http_options):
        self.instance_url = instance_url.rstrip("/")
        self.instance = redact_url(self.instance_url)  # for messages
        headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
        self.http = HttpClient(headers, **http_options)

    def _get(self, path: str, handle: str, params: dict):
        response = self.http.get(f"{self.instance_url}{path}", params)
        if response.status_code == 401:
            raise AuthenticationFailed(f"{self.instance} refused the access token (401): check spec.source.mastodon.accessTokenSecretRef")
        if response.status_code in (403, 410):
            raise PrivateAccount(f"{handle} on {self.instance} is not visible ({response.status_code}): suspended or limited")
        if response.status_code == 404:
            raise UnknownHandle(f"{handle} does not exist on {self.instance}")
        if response.status_code != 200:
            raise StageError(f"{self.instance} answered {response.status_code} for {handle}")
        return response

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        account = self._get("/api/v1/accounts/lookup", handle, {"acct": handle}).json()
        # since_id (not min_id, which pages oldest first) keeps the newest first; it stays on every page, as the
        # Link header's next URL leaves it out.
        params = {"limit": PAGE_SIZE, **({"since_id": since} if since else {})}
        posts: list[Post] = []
        pages = Pages(f"{self.instance} for {handle}")
        while len(posts) < limit:
            response = self._get(f"/api/v1/accounts/{account['id']}/statuses", handle, params)
            statuses = response.json()
            for status in statuses:
                boosted = status.get("reblog") is not None
                content = (status["reblog"] if boosted else status).get("content", "")
                posts.append(Post(str(status["id"]), html_to_text(content), boosted, status.get("created_at", "")))
            match = _NEXT_MAX_ID.search(response.headers.get("Link", ""))
            if not statuses or not match:
                break
            pages.follow(len(statuses), match.group(1))
            params["max_id"] = match.group(1)
        return Timeline(handle, account.get("display_name", ""), posts[:limit])
