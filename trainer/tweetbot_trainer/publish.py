"""The publish stage: the final model from S3 -> a model card, and both to the Hugging Face Hub.

The Hub is optional: without it the card is written next to the model in S3 and the bot still succeeds.
If the Hub cannot be reached, the model stays in S3 and a re-run of this stage publishes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .card import CardFacts, render_card
from .contract import HUB_TOKEN_ENV, HandleStats, StageRequest, StageResult, section_defaults
from .errors import AuthenticationFailed, MissingInput
from .hub import bot_repo_id, call, connect
from .storage import Storage

log = logging.getLogger("tweetbot.publish")
NOT_ON_THE_HUB = {"manifest.json", "samples.json", "training.json"}
UNREACHABLE = "the model stays in S3 and re-running the publish stage publishes it"


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
        api = connect(hub, token, environ)
        repo_id = bot_repo_id(api, hub, request.handles, attempts, backoff, UNREACHABLE)

    card = render_card(CardFacts(
        repo_id=repo_id or "-".join(sorted(request.handles)),
        handles=[HandleStats(**item) for item in stats["handles"]],
        network=stats.get("network", ""), collected_at=stats.get("collectedAt", "")[:10],
        base_model=training.get("baseModel") or section_defaults("model", request.model)["name"],
        hyperparameters=training.get("hyperparameters", {}), deepspeed=training.get("deepspeed", ""),
        metrics=training.get("metrics", {}), samples=samples,
        architecture=(config.get("architectures") or [""])[0], model_type=config.get("model_type", ""),
        tracking=training.get("tracking") or {},
        adapter=(training.get("lora") or {}).get("publish") == "adapter",
    ))
    (model_dir / "README.md").write_text(card)
    storage.put(layout.bucket, layout.final_model + "README.md", card.encode())
    # Empty Hub fields withdraw those of an earlier publish of the run (output.hub was removed since).
    artifacts = {"modelUri": layout.uri("final") + "/", "hubUrl": "", "hubCommit": ""}

    if api is not None:
        call(lambda: api.create_repo(repo_id, private=bool(hub.get("private")), exist_ok=True), f"create {repo_id}",
             attempts, backoff, UNREACHABLE)
        commit = call(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir),
            commit_message=f"TweetBot {request.namespace}/{request.bot}: run {request.run_id}",
            commit_description=f"Trained on posts of {', '.join(sorted(request.handles))}.",
        ), f"upload to {repo_id}", attempts, backoff, UNREACHABLE)
        artifacts.update(hubUrl=f"{api.endpoint.rstrip('/')}/{repo_id}", hubCommit=commit.oid)
        log.info("published %s at commit %s", repo_id, commit.oid)
    shutil.rmtree(workdir, ignore_errors=True)
    return StageResult(stage="publish", run_id=request.run_id, artifacts=artifacts)


def _read_json(path: Path, missing):
    return json.loads(path.read_text()) if path.exists() else missing
