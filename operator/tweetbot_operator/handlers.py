"""The kopf shell around the pure core: gather what exists for a bot, call `plan`, apply the result.

Every trigger (bot created, changed or resumed after an operator restart, one of its Jobs changed, a slow
resync loop) runs the same level-based `reconcile`, so a missed event costs at most one resync interval.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections import defaultdict
from datetime import datetime, timezone

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tweetbot_trainer.contract import BOT_LABEL, GROUP, RUN_LABEL, STAGE_LABEL, STAGES, ContractError, StageResult

from . import metrics
from .artifacts import delete_artifacts, read_progress
from .reconcile import Observed, job_state, plan, run_id_for, s3_layout, secret_needs, status_patch
from .settings import Settings

VERSION = "v1alpha1"
PLURAL = "tweetbots"
FINISHED = ("Succeeded", "Failed")
FINALIZER = f"{GROUP}/artifacts"  # only on bots whose deletionPolicy is Delete

log = logging.getLogger("tweetbot.operator")
SETTINGS = Settings.from_env()
_api: client.ApiClient | None = None
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    global _api
    # kopf's own bookkeeping in annotations under our group; status holds only declared fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only our own events (phase changes, warnings) reach `kubectl describe`, not kopf's per-handler chatter.
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _api = client.ApiClient()
    metrics.serve(SETTINGS.metrics_port)
    log.info("operator started: namespaces=%s trainer image=%s", SETTINGS.namespaces or "all", SETTINGS.trainer_image)


@kopf.on.cleanup()
def close(**_) -> None:
    if _api is not None:
        _api.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def bot_changed(namespace: str, name: str, **_) -> None:
    reconcile(namespace, name)


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **_) -> None:
    memo.resync = asyncio.create_task(_resync_forever())


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_) -> None:
    memo.resync.cancel()


async def _resync_forever() -> None:
    """One slow loop over unfinished bots, for what sends no event (a Secret created later, a lost watch).

    Not a kopf timer: those put a finalizer on every bot, and then no bot could be deleted while the
    operator is down or uninstalled.
    """
    while True:
        await asyncio.sleep(SETTINGS.timer_seconds)
        try:
            for namespace, name in await asyncio.to_thread(_unfinished_bots):
                await asyncio.to_thread(reconcile, namespace, name)
        except Exception:
            log.exception("resync failed; trying again in %.0fs", SETTINGS.timer_seconds)


def _unfinished_bots() -> list[tuple[str, str]]:
    custom = client.CustomObjectsApi(_api)
    if SETTINGS.namespaces:
        bots = [bot for ns in SETTINGS.namespaces
                for bot in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]]
    else:
        bots = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    return [
        (bot["metadata"]["namespace"], bot["metadata"]["name"])
        for bot in bots
        if (bot.get("status") or {}).get("phase") not in FINISHED
        or bot["status"].get("observedGeneration") != bot["metadata"].get("generation")
    ]


@kopf.on.event("batch", "v1", "jobs", labels={BOT_LABEL: kopf.PRESENT})
def job_changed(namespace: str, labels: dict, **_) -> None:
    reconcile(namespace, labels[BOT_LABEL])


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def bot_deleted(namespace: str, name: str, **_) -> None:
    # Its Jobs and pods go with it through owner references; no finalizer, so deletion never waits on us.
    metrics.forget(namespace, name)


@kopf.on.delete(GROUP, VERSION, PLURAL, when=lambda spec, **_: spec.get("deletionPolicy") == "Delete")
def artifacts_deleted(body: kopf.Body, namespace: str, **_) -> None:
    """Only bots with deletionPolicy Delete carry a finalizer, and it is released whatever happens here."""
    bot = dict(body)
    layout = s3_layout(bot, run_id="")  # every run of the bot
    where = f"s3://{layout.bucket}/{layout.run_prefix}/"
    try:
        deleted = delete_artifacts(layout, _s3_credentials(namespace, bot))
    except Exception as error:  # the bot goes anyway; say what is left behind, never a credential
        post_event(bot, "Warning", "ArtifactsLeft", f"could not delete {where}: {type(error).__name__}: {_short(error)}")
        return
    post_event(bot, "Normal", "ArtifactsDeleted", f"deleted {deleted} objects under {where}")


def _s3_credentials(namespace: str, bot: dict) -> dict[str, str] | None:
    """The bot's S3 keys from its Secret, or None to use the operator's own identity."""
    ref = bot["spec"]["output"]["s3"].get("credentialsSecretRef")
    if not ref:
        return None
    secret = client.CoreV1Api(_api).read_namespaced_secret(ref["name"], namespace)
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:297] + "..."


def reconcile(namespace: str, name: str) -> None:
    with _locks[(namespace, name)]:  # a bot's handlers and its Jobs' events would otherwise race
        for attempt in range(3):
            try:
                return _reconcile(namespace, name)
            except ApiException as error:
                if error.status == 409 and attempt < 2:
                    continue  # someone wrote the bot between our read and our status write: read again
                metrics.RECONCILE_ERRORS.inc()
                raise
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                raise


def _reconcile(namespace: str, name: str) -> None:
    custom, batch = client.CustomObjectsApi(_api), client.BatchV1Api(_api)
    try:
        bot = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return
        raise
    if bot["metadata"].get("deletionTimestamp"):
        return
    metrics.RECONCILES.inc()
    jobs = [
        _api.sanitize_for_serialization(job)
        for job in batch.list_namespaced_job(namespace, label_selector=f"{BOT_LABEL}={name}").items
    ]
    observed = Observed(jobs=jobs)
    observed.results = _stage_results(namespace, bot, jobs)
    old_status = bot.get("status") or {}
    if old_status.get("phase") not in FINISHED or old_status.get("observedGeneration") != bot["metadata"]["generation"]:
        observed.secrets = _secret_keys(namespace, bot)
        if SETTINGS.max_concurrent_trainings:
            observed.other_active_trainings = _active_trainings(exclude_bot=(namespace, name))

    run_id = run_id_for(bot)
    if any(job["metadata"]["labels"].get(STAGE_LABEL) == "train" and job["metadata"]["labels"].get(RUN_LABEL) == run_id
           and job_state(job) == "Running" for job in jobs):
        try:
            observed.progress = read_progress(s3_layout(bot, run_id), _s3_credentials(namespace, bot))
        except ApiException:
            observed.progress = None  # its Secret is gone; the stage itself will report that
    decided = plan(bot, observed, SETTINGS, datetime.now(timezone.utc))

    for job_name in decided.delete:
        try:
            batch.delete_namespaced_job(job_name, namespace, propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                raise
    for manifest in decided.create:
        kopf.adopt(manifest, owner=bot)
        try:
            batch.create_namespaced_job(namespace, manifest)
        except ApiException as error:
            if error.status != 409:  # already there: an earlier reconcile created it
                raise
    patch = status_patch(old_status, decided.status)
    if patch:
        # resourceVersion makes this a compare-and-swap: after a concurrent write, 409 and `reconcile` reads again.
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name,
            {"metadata": {"resourceVersion": bot["metadata"]["resourceVersion"]}, "status": patch},
        )
    for event_type, reason, message in decided.events:
        post_event(bot, event_type, reason, message)
    metrics.observe(namespace, name, old_status, decided.status)


def post_event(bot: dict, event_type: str, reason: str, message: str) -> None:
    """A core/v1 Event on the bot. Posted directly rather than with kopf.event, which works only inside
    kopf's own handler context and not from the resync loop."""
    metadata = bot["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        client.CoreV1Api(_api).create_namespaced_event(metadata["namespace"], {
            "metadata": {"generateName": f"{metadata['name']}."},
            "involvedObject": {"apiVersion": bot["apiVersion"], "kind": bot["kind"], "name": metadata["name"],
                               "namespace": metadata["namespace"], "uid": metadata["uid"]},
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": "tweetbot-operator"}, "reportingComponent": "tweetbot-operator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })
    except ApiException as error:  # an event is worth a log line, never a failed reconcile
        log.warning("event %s on %s/%s not posted: %s", reason, metadata["namespace"], metadata["name"], error.status)


def _stage_results(namespace: str, bot: dict, jobs: list[dict]) -> dict[str, StageResult]:
    """Results of ended Jobs not yet recorded in status, from their pods' termination messages."""
    core = client.CoreV1Api(_api)
    recorded = {
        stage.get("jobName")
        for stage in ((bot.get("status") or {}).get("stages") or {}).values()
        if stage.get("state") == "Succeeded"
    }
    results = {}
    for job in jobs:
        job_name, state = job["metadata"]["name"], job_state(job)
        if state not in FINISHED or job_name in recorded:
            continue
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        wanted_phase = "Succeeded" if state == "Succeeded" else "Failed"
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp, reverse=True):
            if pod.status.phase != wanted_phase:
                continue
            message = _termination_message(pod)
            if not message:
                continue
            try:
                results[job_name] = StageResult.from_termination_message(message)
            except ContractError as error:
                results[job_name] = StageResult(stage=job["metadata"]["labels"].get(STAGE_LABEL, ""),
                                                run_id="", ok=False, error=str(error))
            break
    return results


def _termination_message(pod) -> str:
    for container in pod.status.container_statuses or []:
        terminated = container.state.terminated if container.state else None
        if terminated is not None and terminated.message:
            return terminated.message
    return ""


def _secret_keys(namespace: str, bot: dict) -> dict[str, frozenset[str] | None]:
    """Which keys each referenced Secret has; the values are never kept or logged."""
    core = client.CoreV1Api(_api)
    keys: dict[str, frozenset[str] | None] = {}
    for stage in STAGES:
        for need in secret_needs(bot, stage):
            if need.name in keys:
                continue
            try:
                secret = core.read_namespaced_secret(need.name, namespace)
                keys[need.name] = frozenset((secret.data or {}).keys()) | frozenset((secret.string_data or {}).keys())
            except ApiException as error:
                if error.status != 404:
                    raise
                keys[need.name] = None
    return keys


def _active_trainings(exclude_bot: tuple[str, str]) -> int:
    batch = client.BatchV1Api(_api)
    selector = f"{STAGE_LABEL}=train"
    if SETTINGS.namespaces:  # namespaced RBAC: list where we may
        jobs = [job for ns in SETTINGS.namespaces for job in batch.list_namespaced_job(ns, label_selector=selector).items]
    else:
        jobs = batch.list_job_for_all_namespaces(label_selector=selector).items
    return sum(
        1
        for job in jobs
        if (job.metadata.namespace, job.metadata.labels.get(BOT_LABEL)) != exclude_bot
        and job_state(_api.sanitize_for_serialization(job)) not in FINISHED
    )

