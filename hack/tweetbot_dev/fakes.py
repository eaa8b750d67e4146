"""Local HTTP servers speaking the documented wire formats of the post sources, so the real clients run
unchanged against them: X API v2, Mastodon, the Bluesky AppView, and X archive files (tweets.js).

One server answers all of them from one set of accounts. Each post's text is stored as the person typed
it; every route encodes it as its network does (X escapes &, < and >; Mastodon sends HTML).
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class FakePost:
    id: int
    text: str
    is_repost: bool = False
    created_at: str = "2026-01-01T00:00:00.000Z"


@dataclass
class FakeAccount:
    handle: str
    display_name: str
    posts: list[FakePost]  # newest first
    protected: bool = False


def x_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def tweets_js(posts: list[FakePost], part: int = 0) -> str:
    """An X archive's data/tweets.js (or tweets-partN.js) for these posts."""
    items = [
        {"tweet": {"id_str": str(post.id), "id": str(post.id), "created_at": post.created_at,
                   "full_text": x_escape(f"RT @someone: {post.text}" if post.is_repost else post.text)}}
        for post in posts
    ]
    return f"window.YTD.tweets.part{part} = " + json.dumps(items, indent=2, ensure_ascii=False)


@dataclass
class FakeSocialServer:
    accounts: dict[str, FakeAccount]
    x_bearer_token: str = "test-bearer-token"
    rate_limited_requests: int = 0  # the next N timeline requests answer 429
    rate_limit_reset_seconds: float = 1.0
    failing_requests: int = 0  # the next N requests answer 503
    requests: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server._handle(self)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeSocialServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- plumbing ------------------------------------------------------------------------------------

    def _take(self, counter: str) -> bool:
        with self._lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return True
            return False

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append(request.path)
        if self._take("failing_requests"):
            return self._send(request, 503, {"error": "unavailable"})
        path = parts.path
        for prefix, route in (("/2/", self._x), ("/api/v1/", self._mastodon), ("/xrpc/", self._bluesky),
                              ("/archives/", self._archive)):
            if path.startswith(prefix):
                return route(request, path, query)
        self._send(request, 404, {"error": "no such route"})

    def _send(self, request, status: int, body, headers: dict | None = None, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def _rate_limited(self, request, header: str) -> bool:
        if not self._take("rate_limited_requests"):
            return False
        reset = time.time() + self.rate_limit_reset_seconds
        value = str(int(reset)) if header != "X-RateLimit-Reset" else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset))
        self._send(request, 429, {"title": "Too Many Requests"}, {header: value})
        return True

    def _page(self, posts: list, query: dict, cursor_key: str, limit_key: str, default: int, maximum: int):
        limit = min(int(query.get(limit_key, default)), maximum)
        start = int(query.get(cursor_key) or 0)
        end = start + limit
        return posts[start:end], (str(end) if end < len(posts) else None)

    # --- X API v2 --------------------------------------------------------------------------------------

    def _x(self, request, path, query):
        if request.headers.get("Authorization") != f"Bearer {self.x_bearer_token}":
            return self._send(request, 401, {"title": "Unauthorized", "type": "about:blank", "status": 401})
        segments = path.strip("/").split("/")
        if segments[:3] == ["2", "users", "by"] and len(segments) == 5:
            account = self.accounts.get(segments[4].lower())
            if account is None:
                return self._send(request, 200, {"errors": [{
                    "value": segments[4], "detail": f"Could not find user with username: [{segments[4]}].",
                    "title": "Not Found Error", "type": "https://api.twitter.com/2/problems/resource-not-found"}]})
            return self._send(request, 200, {"data": {"id": str(self._user_id(account)), "name": account.display_name,
                                                      "username": account.handle}})
        if len(segments) == 4 and segments[3] == "tweets":
            if self._rate_limited(request, "x-rate-limit-reset"):
                return
            account = self._account_by_id(segments[2])
            if account.protected:
                return self._send(request, 200, {"errors": [{"title": "Authorization Error",
                                                             "detail": "Sorry, you are not authorized to see this user's Tweets."}]})
            if not 5 <= int(query.get("max_results", 10)) <= 100:
                return self._send(request, 400, {"title": "Invalid Request", "detail": "max_results must be 5 to 100"})
            posts = account.posts[:3200]  # the API serves only the newest 3,200
            if query.get("since_id"):
                posts = [p for p in posts if p.id > int(query["since_id"])]
            page, next_token = self._page(posts, query, "pagination_token", "max_results", 10, 100)
            meta = {"result_count": len(page)}
            if page:
                meta.update(newest_id=str(page[0].id), oldest_id=str(page[-1].id))
            if next_token:
                meta["next_token"] = next_token
            return self._send(request, 200, {"data": [self._x_tweet(post) for post in page], "meta": meta} if page else {"meta": meta})
        self._send(request, 404, {"title": "Not Found"})

    @staticmethod
    def _x_tweet(post: FakePost) -> dict:
        text = x_escape(f"RT @someone: {post.text}" if post.is_repost else post.text)
        tweet = {"id": str(post.id), "text": text[:280], "created_at": post.created_at, "edit_history_tweet_ids": [str(post.id)]}
        if post.is_repost:
            tweet["referenced_tweets"] = [{"type": "retweeted", "id": str(post.id + 10**12)}]
        if len(text) > 280:
            tweet["note_tweet"] = {"text": text}  # long posts: the full text lives here
        return tweet

    def _user_id(self, account: FakeAccount) -> int:
        return 1000 + sorted(self.accounts).index(account.handle.lower())

    def _account_by_id(self, user_id: str) -> FakeAccount:
        return self.accounts[sorted(self.accounts)[int(user_id) - 1000]]

    # --- Mastodon -------------------------------------------------------------------------------------

    def _mastodon(self, request, path, query):
        if path == "/api/v1/accounts/lookup":
            account = self.accounts.get(query.get("acct", "").lower())
            if account is None:
                return self._send(request, 404, {"error": "Record not found"})
            return self._send(request, 200, {"id": str(self._user_id(account)), "username": account.handle,
                                             "acct": account.handle, "display_name": account.display_name})
        segments = path.strip("/").split("/")
        if len(segments) == 5 and segments[4] == "statuses":
            if self._rate_limited(request, "X-RateLimit-Reset"):
                return
            account = self._account_by_id(segments[3])
            posts = account.posts
            if query.get("max_id"):
                posts = [p for p in posts if p.id < int(query["max_id"])]
            if query.get("since_id"):
                posts = [p for p in posts if p.id > int(query["since_id"])]
            page = posts[: min(int(query.get("limit", 20)), 40)]
            headers = {}
            if len(page) < len(posts):
                base = f"{self.url}/api/v1/accounts/{segments[3]}/statuses?limit={query.get('limit', 20)}"
                headers["Link"] = f'<{base}&max_id={page[-1].id}>; rel="next", <{base}&min_id={page[0].id}>; rel="prev"'
            return self._send(request, 200, [self._status(post, account) for post in page], headers)
        self._send(request, 404, {"error": "Record not found"})

    @staticmethod
    def _status(post: FakePost, account: FakeAccount) -> dict:
        paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in post.text.split("\n\n"))
        status = {"id": str(post.id), "created_at": post.created_at, "content": paragraphs.replace("\n", "<br />"),
                  "account": {"acct": account.handle}, "reblog": None}
        if post.is_repost:
            status.update(content="", reblog={"id": str(post.id + 10**12), "content": paragraphs, "account": {"acct": "someone"}})
        return status

    # --- Bluesky AppView --------------------------------------------------------------------------------

    def _bluesky(self, request, path, query):
        if path != "/xrpc/app.bsky.feed.getAuthorFeed":
            return self._send(request, 404, {"error": "MethodNotImplemented"})
        if self._rate_limited(request, "ratelimit-reset"):
            return
        account = self.accounts.get(query.get("actor", "").lower())
        if account is None:
            return self._send(request, 400, {"error": "InvalidRequest", "message": "Profile not found"})
        if not 1 <= int(query.get("limit", 50)) <= 100:
            return self._send(request, 400, {"error": "InvalidRequest", "message": "limit must be 1 to 100"})
        page, cursor = self._page(account.posts, query, "cursor", "limit", 50, 100)
        feed = []
        for post in page:
            author = {"handle": "someone.bsky.social", "displayName": "Someone"} if post.is_repost else {
                "handle": account.handle, "displayName": account.display_name}
            item = {"post": {"uri": f"at://did:plc:fake/app.bsky.feed.post/{post.id}", "author": author,
                             "record": {"$type": "app.bsky.feed.post", "text": post.text, "createdAt": post.created_at}}}
            if post.is_repost:
                item["reason"] = {"$type": "app.bsky.feed.defs#reasonRepost", "by": {"handle": account.handle}}
            feed.append(item)
        return self._send(request, 200, {"feed": feed, **({"cursor": cursor} if cursor else {})})

    # --- X archives over HTTP -------------------------------------------------------------------------

    def _archive(self, request, path, query):
        segments = path.strip("/").split("/")
        account = self.accounts.get(segments[1].lower()) if len(segments) == 3 else None
        if account is None or segments[2] != "tweets.js":
            return self._send(request, 404, "not found", content_type="text/plain")
        self._send(request, 200, tweets_js(account.posts), content_type="application/javascript")
