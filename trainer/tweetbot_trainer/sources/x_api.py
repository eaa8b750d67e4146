"""X API v2: a user's timeline, newest first, at most the 3,200 posts the API serves."""

from __future__ import annotations

from ..errors import AuthenticationFailed, PrivateAccount, StageError, UnknownHandle
from . import Pages, Post, Timeline
from .http import HttpClient

TIMELINE_CAP = 3200  # the API never returns older posts than the newest 3,200
PAGE_SIZE = 100


class XApiSource:
    network = "X"

    def __init__(self, api_url: str, bearer_token: str, **http_options):
        self.api_url = api_url.rstrip("/")
        self.http = HttpClient({"Authorization": f"Bearer {bearer_token}"}, **http_options)

    def _get(self, path: str, handle: str, params: dict | None = None) -> dict:
        response = self.http.get(f"{self.api_url}{path}", params)
        if response.status_code == 401:
            raise AuthenticationFailed("the X API refused the bearer token (401): check spec.source.x.bearerTokenSecretRef")
        if response.status_code == 403:
            raise PrivateAccount(f"the X API refused access to @{handle} (403): the account is protected or suspended")
        if response.status_code == 404:
            raise UnknownHandle(f"@{handle} does not exist on X")
        if response.status_code != 200:
            raise StageError(f"the X API answered {response.status_code} for @{handle}")
        return response.json()

    def fetch(self, handle: str, limit: int, since: str = "") -> Timeline:
        user = self._get(f"/2/users/by/username/{handle}", handle)
        if "data" not in user:
            # The API reports a missing or suspended user as 200 with an `errors` list.
            problem = (user.get("errors") or [{}])[0]
            if "suspended" in str(problem.get("detail", "")).lower():
                raise PrivateAccount(f"@{handle} is suspended on X")
            raise UnknownHandle(f"@{handle} does not exist on X")
        user_id = user["data"]["id"]
        limit = min(limit, TIMELINE_CAP)
        params = {"max_results": PAGE_SIZE, "tweet.fields": "created_at,referenced_tweets,note_tweet"}
        if since:
            params["since_id"] = since  # every page then holds only posts newer than it
        posts: list[Post] = []
        pages = Pages(f"the X API for @{handle}")
        while len(posts) < limit:
            page = self._get(f"/2/users/{user_id}/tweets", handle, params)
            if "data" not in page and page.get("errors"):
                raise PrivateAccount(f"@{handle}'s posts are not visible to this token: the account is protected")
            tweets = page.get("data") or []
            for tweet in tweets:
                text = (tweet.get("note_tweet") or {}).get("text") or tweet.get("text", "")
                reposted = any(ref.get("type") == "retweeted" for ref in tweet.get("referenced_tweets") or [])
                posts.append(Post(tweet["id"], text, reposted, tweet.get("created_at", "")))
            next_token = (page.get("meta") or {}).get("next_token")
            if not next_token:
                break
            pages.follow(len(tweets), next_token)
            params["pagination_token"] = next_token
        return Timeline(handle, user["data"].get("name", ""), posts[:limit])
