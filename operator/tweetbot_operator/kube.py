"""JSON requests to the API server over the kubernetes client's own connection pool, TLS and credentials, without
its generated API classes: those validate every argument with pydantic and build model objects, which was
a third of the operator's CPU with a thousand bots (measured with `tweetbot-dev bench`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from urllib.parse import quote, urlencode

from kubernetes import client
from kubernetes.client.rest import ApiException

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT_SECONDS = 30
PAGE_SIZE = 100  # a thousand bots in one response are 60 MB of Python objects once decoded (tracemalloc)
# The API server's Warning headers name what it dropped (a status field the CRD does not know is pruned
# without an error) and what is deprecated. Each text is logged once: with a thousand bots it recurs each pass.
WARNINGS_REMEMBERED = 1000
log = logging.getLogger("tweetbot.kube")


class Kube:
    def __init__(self, api: client.ApiClient):
        self.api = api
        self.warned: set[str] = set()

    def request(self, method: str, path: str, body: dict | None = None, *, query: dict | None = None,
                content_type: str = "application/json") -> dict:
        """The response object; ApiException (with status and reason, as the generated client raises) if
        the API server refuses."""
        headers = {"Accept": "application/json", "User-Agent": self.api.user_agent}
        if body is not None:
            headers["Content-Type"] = content_type
        queries = [(key, value) for key, value in (query or {}).items() if value is not None]
        # The configured credentials, refreshed the client's way (a ServiceAccount token is re-read when due).
        self.api.update_params_for_auth(headers, queries, ["BearerToken"], path, method, body)
        url = self.api.configuration.host + path + (f"?{urlencode(queries)}" if queries else "")
        response = self.api.rest_client.pool_manager.request(
            method, url, headers=headers, body=None if body is None else json.dumps(body), timeout=TIMEOUT_SECONDS,
        )
        for warning in response.headers.getlist("Warning"):
            self._warn(method, path, warning_text(warning))
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=response.data.decode(errors="replace"))
        return json.loads(response.data) if response.data else {}

    def _warn(self, method: str, path: str, warning: str) -> None:
        if warning in self.warned:
            return
        if len(self.warned) >= WARNINGS_REMEMBERED:
            self.warned.clear()
        self.warned.add(warning)
        log.warning("the API server warns on %s %s: %s", method, path, warning)

    def get(self, path: str, **query) -> dict:
        return self.request("GET", path, query=query)

    def items(self, path: str, **query) -> Iterator[dict]:
        """Every object of a list, read a page at a time."""
        query["limit"] = PAGE_SIZE
        while True:
            page = self.get(path, **query)
            yield from page["items"]
            query["continue"] = page["metadata"].get("continue")
            if not query["continue"]:
                return

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self.request("DELETE", path, body)


def warning_text(header: str) -> str:
    """The text of a Warning header, `299 - "unknown field \\"spec.x\\""` (RFC 7234), unquoted."""
    match = re.fullmatch(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"(?: .*)?', header.strip())
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else header


def path(group_version: str, plural: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """/api/v1/... for the core group ("v1"), /apis/<group>/<version>/... for the others. Names are escaped
    whole ('/' and '.' segments included): a name from a spec can never reach another path."""
    parts = ["/api" if "/" not in group_version else "/apis", group_version]
    if namespace is not None:
        parts += ["namespaces", _segment(namespace)]
    parts.append(plural)
    if name is not None:
        parts.append(_segment(name))
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


def _segment(name: str) -> str:
    if name in ("", ".", ".."):  # no escaping keeps these from meaning "this" or "the parent" collection
        raise ValueError(f"{name!r} is not an object name")
    return quote(name, safe="")
