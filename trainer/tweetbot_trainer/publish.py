"""The publish stage: the final model from S3 -> a model card, and both to the Hugging Face Hub.

The Hub is optional: without it the card is written next to the model in S3 and the bot still succeeds.
If the Hub cannot be reached, the model stays in S3 and a re-run of this stage publishes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .card import CardFacts, render_card
from .contract import HUB_TOKEN_ENV, HandleStats, StageRequest, StageResult, section_defaults
from .errors import AuthenticationFailed, HubForbidden, MissingInput, NetworkFailure, StageError
from .storage import Storage

log = logging.getLogger("tweetbot.publish")
NOT_ON_THE_HUB = {"manifest.json", "samples.json", "training.json"}
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


def run_publish(request: StageRequest, storage: Storage, environ: dict[str, str] | None = None,
                attempts: int = 4, backoff: float = 1.0) -> StageResult:
    environ = os.environ if environ is None else environ
    layout = request.s3
    try:
        manifest = json.loads(storage.read(f"s3://{layout.bucket}/{layout.final_model}manifest.json"))
        stats = json.loads(storage.read(f"s3://{layout.bucket}/{layout.stats}"))
    except FileNotFoundError:
        raise MissingInput(f"no complete model at s3://{layout.bucket}/{layout.final_model}: run the train stage first") from None

    workdir = Path(tempfile.mkdtemp(prefix="tweetbot-publish-"))
    model_dir = workdir / "model"
    storage.download_files(layout.bucket, manifest["files"], layout.final_model, model_dir)
    training, samples, config = (_read_json(model_dir / name, empty) for name, empty in
                                 (("training.json", {}), ("samples.json", []), ("config.json", {})))
    for name in NOT_ON_THE_HUB:
        (model_dir / name).unlink(missing_ok=True)

    hub = request.hub
    api = repo_id = None
    if hub is not None:
        token = environ.get(HUB_TOKEN_ENV, "")
        if not token:
            raise AuthenticationFailed(f"no Hub token: {HUB_TOKEN_ENV} is empty (check spec.output.hub.tokenSecretRef)")
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.get("endpoint") or environ.get("HF_ENDPOINT") or None, token=token)
        repo_id = hub.get("repoId") or default_repo_id(
            _call(lambda: api.whoami()["name"], "read the token owner", attempts, backoff), request.handles)

    card = render_card(CardFacts(
        repo_id=repo_id or "-".join(sorted(request.handles)),
        handles=[HandleStats(**item) for item in stats["handles"]],
        network=stats.get("network", ""), collected_at=stats.get("collectedAt", "")[:10],
        base_model=training.get("baseModel") or section_defaults("model", request.model)["name"],
        hyperparameters=training.get("hyperparameters", {}), deepspeed=training.get("deepspeed", ""),
        metrics=training.get("metrics", {}), samples=samples,
        architecture=(config.get("architectures") or [""])[0], model_type=config.get("model_type", ""),
        adapter=(training.get("lora") or {}).get("publish") == "adapter",
    ))
    (model_dir / "README.md").write_text(card)
    storage.put(layout.bucket, layout.final_model + "README.md", card.encode())
    artifacts = {"modelUri": layout.uri("final") + "/"}

    if api is not None:
        _call(lambda: api.create_repo(repo_id, private=bool(hub.get("private")), exist_ok=True), f"create {repo_id}", attempts, backoff)
        commit = _call(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir),
            commit_message=f"TweetBot {request.namespace}/{request.bot}: run {request.run_id}",
            commit_description=f"Trained on posts of {', '.join(sorted(request.handles))}.",
        ), f"upload to {repo_id}", attempts, backoff)
        artifacts.update(hubUrl=f"{api.endpoint.rstrip('/')}/{repo_id}", hubCommit=commit.oid)
        log.info("published %s at commit %s", repo_id, commit.oid)
    shutil.rmtree(workdir, ignore_errors=True)
    return StageResult(stage="publish", run_id=request.run_id, artifacts=artifacts)


def _read_json(path: Path, missing):
    return json.loads(path.read_text()) if path.exists() else missing


def _call(action, what: str, attempts: int, backoff: float):
    """Run a Hub call: auth errors fail at once with what to fix; network and 5xx errors are retried."""
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
                raise NetworkFailure(f"the Hub cannot be reached to {what} ({type(error).__name__}); the model stays in S3 "
                                     "and re-running the publish stage publishes it") from None
        time.sleep(backoff * 2 ** (attempt - 1))
