"""GET with the patience a scraper needs: network failures and 5xx retried with back-off, 429 waited out
until the reset time the server announces, within a budget. Every loop is bounded: attempts per request,
429s in a row, seconds spent waiting for rate limits, and seconds in all."""

from __future__ import annotations

import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests

from ..errors import NetworkFailure, RateLimited, redact_url

MIN_RATE_LIMIT_WAIT = 1.0  # a server answering 429 with `Retry-After: 0` is not asked again at once
MAX_RATE_LIMITED = 10  # 429s in a row for one request: a real limit opens after one wait
# All requests and waits of one scrape (every handle). Generous: the CRD allows 1,000,000 posts a handle,
# 25,000 Mastodon pages.
TIME_BUDGET = 3 * 3600.0


def host_of(url: str) -> str:
    """host[:port] of a URL, without the userinfo a URL may carry."""
    return urlsplit(redact_url(url)).netloc


class HttpClient:
    def __init__(self, headers: dict[str, str] | None = None, *, attempts: int = 4, backoff: float = 0.5,
                 rate_limit_budget: float = 900.0, time_budget: float = TIME_BUDGET, timeout: float = 30.0,
                 sleep=time.sleep, clock=time.time):
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": "tweetbot-trainer", **(headers or {})})
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self.rate_limit_budget, self.rate_limit_waited = rate_limit_budget, 0.0
        self.sleep, self.clock = sleep, clock
        self.time_budget, self.started = time_budget, clock()
        self.requests = 0

    def get(self, url: str, params: dict | None = None) -> requests.Response:
        host = host_of(url)
        failures = rate_limited = 0
        while True:
            if self.clock() - self.started > self.time_budget:
                raise NetworkFailure(f"the scrape spent more than its {self.time_budget:.0f}s time budget on {host}")
            self.requests += 1
            try:
                response = self.session.get(url, params=params, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                failures += 1
                if failures >= self.attempts:
                    raise NetworkFailure(f"cannot reach {host} after {failures} attempts ({type(error).__name__})") from None
                self.sleep(self.backoff * 2 ** (failures - 1))
                continue
            if response.status_code == 429:
                rate_limited += 1
                if rate_limited >= MAX_RATE_LIMITED:
                    raise RateLimited(f"{host} answered 429 {rate_limited} times in a row for one request")
                self._wait_for_reset(response, host)
                continue
            if response.status_code >= 500:
                failures += 1
                if failures >= self.attempts:
                    raise NetworkFailure(f"{host} answered {response.status_code} {failures} times in a row")
                self.sleep(self.backoff * 2 ** (failures - 1))
                continue
            return response

    def _wait_for_reset(self, response: requests.Response, host: str) -> None:
        headers = response.headers  # X: x-rate-limit-reset, Mastodon: X-RateLimit-Reset, Bluesky: ratelimit-reset
        reset = headers.get("x-rate-limit-reset") or headers.get("x-ratelimit-reset") or headers.get("ratelimit-reset")
        retry_after = headers.get("retry-after")
        if reset:
            wait = _epoch(reset) - self.clock() + 1
        elif retry_after:
            wait = _seconds(retry_after, self.clock())
        else:
            wait = 60.0
        wait = max(MIN_RATE_LIMIT_WAIT, wait)
        if self.rate_limit_waited + wait > self.rate_limit_budget:
            raise RateLimited(
                f"{host} rate limit: the next window opens in {wait:.0f}s, beyond the remaining "
                f"{self.rate_limit_budget - self.rate_limit_waited:.0f}s of the {self.rate_limit_budget:.0f}s budget"
            )
        self.rate_limit_waited += wait
        self.sleep(wait)


def _epoch(reset: str) -> float:
    """X and Bluesky send epoch seconds; Mastodon sends an ISO 8601 time."""
    try:
        return float(reset)
    except ValueError:
        return datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()


def _seconds(retry_after: str, now: float) -> float:
    """Retry-After is seconds or an HTTP date; one that is neither means a minute."""
    try:
        return float(retry_after)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(retry_after).timestamp() - now
    except (TypeError, ValueError):
        return 60.0
