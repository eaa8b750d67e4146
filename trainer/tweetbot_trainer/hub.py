"""The Hugging Face Hub as the stages use it: the bot's repository, Hub calls retried with errors that say what
to fix, (train stage) checkpoints pushed to a branch of the repository, and the base-model cache the operator may
mount. No transformers here."""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, MutableMapping
from urllib.parse import quote, urlsplit

from .contract import HUB_PUSH_TOKEN_ENV, StageRequest
from .errors import AuthenticationFailed, HubForbidden, NetworkFailure, StageError

log = logging.getLogger("tweetbot.hub")
MAX_REPO_ID = 96  # the Hub's limit, owner and '/' included


def default_repo_id(owner: str, handles: list[str]) -> str:
    """`<owner>/<handles, sorted and joined by '-'>` (huggingtweets' naming) made a repo id the Hub accepts:
    '@' of a Mastodon `user@instance` becomes '-at-', other characters outside letters, digits, '_', '.' and
    '-' become '-', runs of '-' and '.' one '-', and neither end is '-' or '.'. A name cut to fit ends in a
    hash of the handles, so two long sets of handles never share a repository."""
    wanted = "-".join(sorted(handle.lstrip("@") for handle in handles))
    name = re.sub(r"[^A-Za-z0-9._-]", "-", wanted.replace("@", "-at-"))
    name = re.sub(r"[-.]{2,}", "-", name).strip("-.")
    if name.endswith(".git"):  # the Hub reserves it
        name = name[: -len(".git")] + "-git"
    room = MAX_REPO_ID - len(owner) - 1
    if len(name) > room or not name:
        digest = hashlib.sha256(wanted.encode()).hexdigest()[:8]
        name = (name[: room - len(digest) - 1].rstrip("-.") or "tweetbot") + "-" + digest
    return f"{owner}/{name}"


DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub's, without HF_ENDPOINT


def hub_cache_key(endpoint: str) -> str:
    """The base-model cache's directory for one Hub endpoint: its host[:port] and path, percent-encoded into one
    path segment, so two endpoints' repositories of the same name never share files."""
    parts = urlsplit((endpoint or DEFAULT_ENDPOINT).rstrip("/"))
    key = quote(parts.netloc.lower() + parts.path, safe="")
    return key if key.strip(".") else f"_{key}"  # never the cache itself or its parent


def use_model_cache(root: Path, environ: MutableMapping[str, str]) -> Path | None:
    """Point huggingface_hub at `root`/<endpoint key> (HF_HUB_CACHE) where the operator mounted a cache at `root`,
    so pods on a node (or sharing the volume) download a model's files once. huggingface_hub keys its cache by
    repository and commit, resolves a branch to its newest commit on every load (a metadata request), and locks
    each file while one pod downloads it. It reads HF_HUB_CACHE once, when imported: call this before. A cache this
    pod cannot write is passed over with a warning: it costs a download, never the stage."""
    if not root.is_dir():
        return None
    cache = root / hub_cache_key(environ.get("HF_ENDPOINT", ""))
    try:
        cache.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):  # what access() would not tell: a read-only or root-squashed mount
            pass
    except OSError as error:
        log.warning("the model cache %s cannot be written (%s): the base model is downloaded into the pod's own "
                    "cache; the directory must be writable by uid 1000", cache, error.strerror or type(error).__name__)
        return None
    environ["HF_HUB_CACHE"] = str(cache)
    log.info("base models are cached in %s", cache)
    return cache


def connect(hub: dict, token: str, environ: Mapping[str, str]):
    """A client of spec.output.hub's endpoint (else HF_ENDPOINT's, else the Hub) that signs with `token` alone: a
    token passed in is the only one it sends, whatever HF_TOKEN holds."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.get("endpoint") or environ.get("HF_ENDPOINT") or None, token=token)


def bot_repo_id(api, hub: dict, handles: list[str], attempts: int, backoff: float, unreachable: str = "") -> str:
    """spec.output.hub.repoId, else the default under the token's owner: the one repository both stages write."""
    return hub.get("repoId") or default_repo_id(
        call(lambda: api.whoami()["name"], "read the token owner", attempts, backoff, unreachable), handles)


def call(action: Callable, what: str, attempts: int, backoff: float, unreachable: str = ""):
    """Run a Hub call: auth errors fail at once with what to fix; network and 5xx errors are retried.
    `unreachable`: what a NetworkFailure adds after its reason (what becomes of the work)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # huggingface_hub 1.x and later speak httpx (2.x: its fork httpx2); older ones requests
        from httpx2 import TransportError
    except ImportError:
        try:
            from httpx import TransportError
        except ImportError:
            from requests import RequestException as TransportError

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else 0
            if status == 401:
                raise AuthenticationFailed(f"the Hub refused the token (401) trying to {what}: check spec.output.hub.tokenSecretRef") from None
            if status == 403:
                raise HubForbidden(f"the token may not {what} (403): the repository belongs to someone else or the token is read-only") from None
            if status < 500 or attempt == attempts:
                raise StageError(f"the Hub answered {status} trying to {what}") from None
        except (TransportError, OSError) as error:
            if attempt == attempts:
                raise NetworkFailure(f"the Hub cannot be reached to {what} ({type(error).__name__})"
                                     + (f"; {unreachable}" if unreachable else "")) from None
        time.sleep(backoff * 2 ** (attempt - 1))


class HubCheckpoints:
    """Pushes each checkpoint, after S3 holds it, to spec.output.hub.checkpointBranch, replacing the one before,
    so the branch holds the newest checkpoint and `main` only the published model. Best effort: S3 is the record
    the stage resumes from, so a push that fails is logged (once per reason, never with the token) and the next
    checkpoint tries again; training goes on."""

    def __init__(self, request: StageRequest, environ: Mapping[str, str], attempts: int = 2, backoff: float = 1.0):
        self.request, self.hub = request, request.hub or {}
        self.branch = self.hub.get("checkpointBranch") or "checkpoints"
        self.attempts, self.backoff = attempts, backoff
        # The output repository's own token, never HF_TOKEN (the base model's read token in this stage).
        self.token = environ.get(HUB_PUSH_TOKEN_ENV, "")
        self.environ = environ
        self.api = self.repo_id = None
        self.revision: str | None = None  # "<branch>@<commit>" of the newest push
        self.warned = ""

    @classmethod
    def wanted(cls, request: StageRequest, environ: Mapping[str, str]) -> HubCheckpoints | None:
        return cls(request, environ) if request.hub and request.hub.get("checkpoints") else None

    def push(self, local: Path, step: int) -> None:
        """Never raises: a Hub that fails must not fail training."""
        started = time.monotonic()
        try:
            if not self.token:
                raise AuthenticationFailed(f"no Hub token: {HUB_PUSH_TOKEN_ENV} is empty (check spec.output.hub.tokenSecretRef)")
            commit = self._push(local, step)
        except Exception as error:  # a best-effort copy: whatever went wrong, training goes on
            reason = f"{type(error).__name__}: {error}" if isinstance(error, StageError) else type(error).__name__
            if reason != self.warned:
                log.warning("checkpoint %d not pushed to the Hub (%s); it is in S3, and the next checkpoint is "
                            "pushed again", step, reason)
                self.warned = reason
            return
        self.revision, self.warned = f"{self.branch}@{commit}", ""
        log.info("checkpoint %d pushed to %s on branch %s at commit %s (%.1fs)", step, self.repo_id, self.branch,
                 commit, time.monotonic() - started)

    def _push(self, local: Path, step: int) -> str:
        attempts, backoff = self.attempts, self.backoff
        if self.repo_id is None:  # once the repository and its branch exist; a failure tries all again next time
            api = connect(self.hub, self.token, self.environ)
            repo_id = bot_repo_id(api, self.hub, self.request.handles, attempts, backoff)
            call(lambda: api.create_repo(repo_id, private=bool(self.hub.get("private")), exist_ok=True),
                 f"create {repo_id}", attempts, backoff)
            call(lambda: api.create_branch(repo_id, branch=self.branch, exist_ok=True),
                 f"create branch {self.branch} of {repo_id}", attempts, backoff)
            self.api, self.repo_id = api, repo_id
        request = self.request
        # delete_patterns="*": the files of the checkpoint before go in the same commit, so the branch holds one.
        commit = call(lambda: self.api.upload_folder(
            repo_id=self.repo_id, folder_path=str(local), revision=self.branch, delete_patterns="*",
            commit_message=f"TweetBot checkpoint step {step} of run {request.run_id}",
            commit_description=f"TweetBot {request.namespace}/{request.bot}: a transformers Trainer checkpoint; "
                               "the published model is on main.",
        ), f"push checkpoint {step} to {self.repo_id}@{self.branch}", attempts, backoff)
        return commit.oid
