"""The kopf shell around the pure core: gather what exists for a bot, call `plan`, apply the result.

Every trigger (bot created, changed or resumed after an operator restart, one of its Jobs changed, a slow
resync loop) runs the same level-based `reconcile`, so a missed event costs at most one resync interval.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tweetbot_trainer.contract import BOT_LABEL, GROUP, RUN_LABEL, STAGE_LABEL, Progress, StageResult

from . import metrics
from .artifacts import delete_artifacts, read_progress
from .cache import Key, WatchCache
from .kube import Kube, path
from .workqueue import NEW, UPDATE, Request, WorkQueue
from .reconcile import (
    BOT_IDENTITY,
    SECRET_OPT_IN_LABEL,
    InvalidSpec,
    Observed,
    SecretView,
    job_fingerprint,
    job_state,
    occupies_training_slot,
    plan,
    run_id_for,
    s3_identity,
    s3_layout,
    secret_view,
    stage_result_from_pod,
    status_patch,
    validate_spec,
)
from .settings import Settings

VERSION = "v1alpha1"
PLURAL = "tweetbots"
FINISHED = ("Succeeded", "Failed")
FINALIZER = f"{GROUP}/artifacts"  # only on bots whose deletionPolicy is Delete

log = logging.getLogger("tweetbot.operator")
SETTINGS = Settings.from_env()
_api: client.ApiClient | None = None
_kube: Kube | None = None
BOTS = f"{GROUP}/{VERSION}"
# The resourceVersions our latest status writes gave each bot: events carrying them bring nothing new.
_own_versions: defaultdict[Key, deque[str]] = defaultdict(lambda: deque(maxlen=4))
_last_reconciled: dict[Key, float] = {}  # monotonic time of each bot's last full pass
_failures: dict[Key, int] = {}  # consecutive failed passes of each bot
_deletion_errors: dict[Key, str] = {}  # the last ArtifactsLeft message of each bot, posted once
_requeues: dict[Key, float] = {}  # when each bot's next timed pass is due (monotonic)
_rejections: dict[Key, tuple[float, str]] = {}  # Jobs the API server refused: when, and its message
_job_fingerprints: dict[Key, tuple] = {}  # what the last reconcile knew of each Job
_queue = WorkQueue(max_updates=max(1, SETTINGS.workers // 4))  # 4 of 16: measured in issue 9 (README, Benchmarks)
_events = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
_cache = WatchCache()


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf deep-copies every event's whole body to diff it against the last handled one, which only
    create/update handlers use; with raw event handlers alone the copy is waste (9% of the operator's py-spy
    samples at 1,000 bots)."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return {}

    def store(self, *, body, patch, essence) -> None:
        pass


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    global _api, _kube
    # Bots and Jobs are handled from raw watch events only, so kopf keeps no bookkeeping on them (no
    # annotations, no finalizer of its own, no diff of every change). Our finalizer is managed in `_reconcile`.
    # Only our own events (phase changes, warnings) reach `kubectl describe`, not kopf's per-handler chatter,
    # and its "handler succeeded" line per watch event stays out of the log.
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = _NoDiffBase()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf waits this long after an object's event for more before handling it; our queue merges bursts.
    settings.batching.batch_window = 0.01
    # An object's kopf worker (holding the object's last body) lives this long after its last event: with
    # thousands of Jobs changing within a minute, kopf's 5 s default keeps most of them in memory at once.
    settings.batching.idle_timeout = 0.5
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = SETTINGS.workers + 2  # one per worker, the resync loop, the deletions
    _api = client.ApiClient(configuration)
    _api.user_agent = "tweetbot-operator"
    _kube = Kube(_api)
    # The Jobs that exist before the first bot is looked at, so no pass starts from an empty picture.
    for job in _bot_jobs():
        _cache.put_job(job)
    for number in range(SETTINGS.workers):
        threading.Thread(target=_work, name=f"reconcile-{number}", daemon=True).start()
    metrics.serve(SETTINGS.metrics_port)
    log.info("operator started: namespaces=%s trainer image=%s", SETTINGS.namespaces or "all", SETTINGS.trainer_image)


@kopf.on.cleanup()
def close(**_) -> None:
    _queue.close()
    if _api is not None:
        _api.close()


# The watch handlers only note what they saw and queue the bot; worker threads reconcile from the queue.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def bot_event(event: dict, namespace: str, name: str, **_) -> None:
    """Every change of a bot, and every bot once at start-up, is a reason to reconcile it: level-based, so a
    missed or repeated event does no harm."""
    key = (namespace, name)
    if event["type"] == "DELETED":
        # Its Jobs and pods go with it through owner references.
        metrics.forget(namespace, name)
        _own_versions.pop(key, None)
        _last_reconciled.pop(key, None)
        _failures.pop(key, None)
        _cache.forget_bot(key)
        _deletion_errors.pop(key, None)
        _requeues.pop(key, None)
        return
    bot = event["object"]
    _cache.put_bot(bot)
    _queue.add(key, Request(priority=UPDATE if bot.get("status") else NEW,
                            echo_of=bot["metadata"].get("resourceVersion")))


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **_) -> None:
    memo.resync = asyncio.create_task(_resync_forever())


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_) -> None:
    memo.resync.cancel()


async def _resync_forever() -> None:
    """One slow loop over unfinished bots, for what sends no event (a Secret created later, a lost watch,
    training progress in S3). Bots reconciled by an event within the interval are skipped.

    Not a kopf timer: those put a finalizer on every bot, and then no bot could be deleted while the
    operator is down or uninstalled.
    """
    while True:
        await asyncio.sleep(SETTINGS.timer_seconds)
        try:
            bots = await asyncio.to_thread(_unfinished_bots)
        except Exception as error:
            log.warning("resync could not list bots (%s); trying again in %.0fs", type(error).__name__, SETTINGS.timer_seconds)
            continue
        for key in bots:
            if time.monotonic() - _last_reconciled.get(key, 0.0) >= SETTINGS.timer_seconds * 0.9:
                _queue.add(key, Request(fresh=True))


def _unfinished_bots() -> list[Key]:
    namespaces = SETTINGS.namespaces or (None,)
    bots = itertools.chain.from_iterable(_kube.items(path(BOTS, PLURAL, namespace)) for namespace in namespaces)
    return [
        (bot["metadata"]["namespace"], bot["metadata"]["name"])
        for bot in bots
        if (bot.get("status") or {}).get("phase") not in FINISHED
        or bot["status"].get("observedGeneration") != bot["metadata"].get("generation")
    ]


@kopf.on.event("batch", "v1", "jobs", labels={BOT_LABEL: kopf.PRESENT})
async def job_changed(event: dict, namespace: str, name: str, labels: dict, **_) -> None:
    # Most Job updates (ready counts, pod bookkeeping) change nothing the bot's status is made of.
    key = (namespace, name)
    if event["type"] == "DELETED":
        _job_fingerprints.pop(key, None)
        _cache.forget_job(event["object"])
    else:
        _cache.put_job(event["object"])
        fingerprint = job_fingerprint(event["object"])
        if _job_fingerprints.get(key) == fingerprint:
            return
        _job_fingerprints[key] = fingerprint
    _queue.add((namespace, labels[BOT_LABEL]))


class ArtifactsLeft(Exception):
    """Deleting a bot's artifacts did not finish; the finalizer stays and the deletion is tried again."""


def _delete_artifacts(namespace: str, bot: dict) -> None:
    """Delete exactly the runs this bot recorded, or raise ArtifactsLeft saying what is left and the way out."""
    status = bot.get("status") or {}
    runs = list(dict.fromkeys([*(status.get("runs") or []), status.get("runId") or run_id_for(bot)]))
    layouts = [s3_layout(bot, run) for run in runs]
    where = f"s3://{layouts[0].bucket}/{layouts[0].bot_prefix}/"
    try:
        validate_spec(bot, SETTINGS)  # the endpoint, bucket and identity as they are allowed now
        deleted = delete_artifacts(layouts, _s3_credentials(namespace, bot), deadline_seconds=60)
    except Exception as error:  # never a credential: messages are the API's, S3's error codes or our own
        message = (f"could not delete the runs {', '.join(runs)} under {where}: {type(error).__name__}: "
                   f"{_short(error)}; the bot stays until they are deleted or spec.deletionPolicy is set to Retain")
        if _deletion_errors.get((namespace, bot["metadata"]["name"])) != message:
            _deletion_errors[(namespace, bot["metadata"]["name"])] = message
            post_event(bot, "Warning", "ArtifactsLeft", message)
        raise ArtifactsLeft(message) from None
    _deletion_errors.pop((namespace, bot["metadata"]["name"]), None)
    post_event(bot, "Normal", "ArtifactsDeleted", f"deleted {deleted} objects of {len(runs)} run(s) under {where}")


def _set_finalizers(namespace: str, bot: dict, finalizers: list[str]) -> dict:
    """Write the bot's finalizers (compare-and-swap on its resourceVersion); returns the bot as written."""
    return _write_bot(namespace, bot, path(BOTS, PLURAL, namespace, bot["metadata"]["name"]), {"finalizers": finalizers})


def _write_bot(namespace: str, bot: dict, url: str, metadata: dict | None = None, status: dict | None = None) -> dict:
    """A merge patch of the bot that is refused (409) if the bot changed since `bot` was read. Its result goes
    into the cache, and its resourceVersion is remembered so that the watch's echo of it starts no pass."""
    body = {"metadata": {**(metadata or {}), "resourceVersion": bot["metadata"]["resourceVersion"]}}
    if status is not None:
        body["status"] = status
    written = _kube.merge_patch(url, body)
    _own_versions[(namespace, bot["metadata"]["name"])].append(written["metadata"]["resourceVersion"])
    _cache.put_bot(written)
    return written


def _s3_credentials(namespace: str, bot: dict) -> dict[str, str] | None:
    """The bot's S3 keys from its Secret if it opted in, or None to use the operator's own identity (only
    where `s3_identity` allows it)."""
    ref = bot["spec"]["output"]["s3"].get("credentialsSecretRef")
    if not ref:
        return None
    secret = _kube.get(path("v1", "secrets", namespace, ref["name"]))
    if not secret_view(secret).opted_in:
        raise InvalidSpec(f"Secret {ref['name']!r} is not labelled {SECRET_OPT_IN_LABEL}=true")
    return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:297] + "..."


def _work() -> None:
    while (item := _queue.get()) is not None:
        key, request = item
        try:
            reconcile(*key, request)
        finally:
            _queue.done(key)


def reconcile(namespace: str, name: str, request: Request = Request()) -> None:
    """One pass over one bot (the queue hands a bot to one worker at a time).

    An event that carries the resourceVersion our own status write gave the bot is its echo: nothing new
    (checked here, not in the handler, since the watch may deliver the echo before the write returns). A
    pass reads the bot and its Jobs from the watch cache; a `fresh` one (the resync loop's, a retry after a
    conflict or an error) reads them from the API server.
    """
    key = (namespace, name)
    if request.echo_of is not None and request.echo_of in _own_versions[key]:
        return
    try:
        for attempt in range(3):
            try:
                _reconcile(namespace, name, fresh=request.fresh or attempt > 0)
                break
            except ApiException as error:
                if error.status != 409 or attempt == 2:
                    raise  # 409: someone wrote the bot between our read and our status write: read again
        _failures.pop(key, None)
    except Exception as error:
        # Watch events are not redelivered: retry with a growing delay, capped at the resync interval.
        metrics.RECONCILE_ERRORS.inc()
        _failures[key] = _failures.get(key, 0) + 1
        delay = min(SETTINGS.timer_seconds, 2.0 ** _failures[key])
        reason = f"API answered {error.status} {error.reason}" if isinstance(error, ApiException) else _short(error)
        log.warning("reconcile of %s/%s failed (%s: %s); retrying in %.0fs",
                    namespace, name, type(error).__name__, reason, delay)
        retry = threading.Timer(delay, _queue.add, (key, Request(fresh=True)))
        retry.daemon = True
        retry.start()


def _reconcile(namespace: str, name: str, fresh: bool) -> None:
    key = (namespace, name)
    bot = None if fresh else _cache.bot(key)
    if bot is None:
        try:
            bot = _kube.get(path(BOTS, PLURAL, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return
            raise
        _cache.put_bot(bot)
    # Only bots whose deletionPolicy is Delete carry our finalizer, released once their artifacts are gone
    # or the policy is changed to Retain (the way out when S3 or the credentials are gone for good).
    finalizers = bot["metadata"].get("finalizers") or []
    others = [finalizer for finalizer in finalizers if finalizer != FINALIZER]
    if bot["metadata"].get("deletionTimestamp"):
        if FINALIZER in finalizers:
            if bot["spec"].get("deletionPolicy") == "Delete":
                _delete_artifacts(namespace, bot)
            _set_finalizers(namespace, bot, others)
        return
    wanted = others + [FINALIZER] if bot["spec"].get("deletionPolicy") == "Delete" and _valid(bot) else others
    if wanted != finalizers:
        bot = _set_finalizers(namespace, bot, wanted)
    metrics.RECONCILES.inc()
    if fresh:
        jobs = list(_kube.items(path("batch/v1", "jobs", namespace), labelSelector=f"{BOT_LABEL}={name}"))
        _cache.replace_jobs(key, jobs)
    else:
        jobs = _cache.jobs(key)
    observed = Observed(jobs=jobs, secrets=SecretKeys(namespace), rejected=_recent_rejections(namespace, jobs))
    observed.results = _stage_results(namespace, bot, jobs)
    old_status = bot.get("status") or {}
    if SETTINGS.max_concurrent_trainings and (
        old_status.get("phase") not in FINISHED or old_status.get("observedGeneration") != bot["metadata"]["generation"]
    ):
        observed.other_active_trainings = _active_trainings(exclude_bot=(namespace, name))

    observed.progress = _progress(namespace, bot, jobs)
    decided = plan(bot, observed, SETTINGS, datetime.now(timezone.utc))

    for job_name in decided.delete:
        try:
            _kube.delete(path("batch/v1", "jobs", namespace, job_name), {"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status != 404:
                raise
        _cache.forget_job(next(job for job in jobs if job["metadata"]["name"] == job_name))
    # A new bot's first Job goes out before anything else is written: its status (and event) follow in the
    # pass its ADDED event brings, queued behind other new bots. Later passes record what they created at once.
    first_job_only = bool(decided.create) and not old_status
    for manifest in decided.create:
        kopf.adopt(manifest, owner=bot)
        job_key = (namespace, manifest["metadata"]["name"])
        if not first_job_only:
            # This pass writes the new Job's state into the status: its ADDED event (which may arrive before
            # the create call returns) brings nothing new.
            _job_fingerprints[job_key] = job_fingerprint(manifest)
        try:
            _cache.put_job(_kube.create(path("batch/v1", "jobs", namespace), manifest))
        except ApiException as error:
            _job_fingerprints.pop(job_key, None)
            if not _refused(error):
                raise
            if error.status == 409:  # already there: an earlier reconcile created it
                first_job_only = False  # its ADDED event may be long gone: record it now
                continue
            # Retrying will not help before something changes (the spec, a quota, a policy): say so in the
            # status at once, and try again at the next resync.
            _rejections[job_key] = (time.monotonic(), _server_message(error))
            observed.rejected = _recent_rejections(namespace, jobs)
            decided = plan(bot, observed, SETTINGS, datetime.now(timezone.utc))
            first_job_only = False
    if first_job_only:
        _last_reconciled[key] = time.monotonic()
        return
    patch = status_patch(old_status, decided.status)
    if patch:  # after a concurrent write: 409, and `reconcile` reads the bot again
        _write_bot(namespace, bot, path(BOTS, PLURAL, namespace, name, "status"), status=patch)
    for event_type, reason, message in decided.events:
        post_event(bot, event_type, reason, message)
    metrics.observe(namespace, name, old_status, decided.status)
    _last_reconciled[key] = time.monotonic()
    if decided.requeue_after is not None:
        _requeue(key, decided.requeue_after)


def _requeue(key: Key, seconds: float) -> None:
    """Reconcile the bot again in `seconds`, unless an earlier pass is already due: finished bots get no
    resync, and a finished Job's TTL must still be applied."""
    now = time.monotonic()
    previous = _requeues.get(key)
    if previous is not None and now < previous <= now + seconds:
        return
    due = now + seconds
    _requeues[key] = due
    timer = threading.Timer(seconds, _queue.add, (key, Request()))
    timer.daemon = True
    timer.start()


def _valid(bot: dict) -> bool:
    try:
        validate_spec(bot, SETTINGS)
    except InvalidSpec:
        return False
    return True


def _refused(error: ApiException) -> bool:
    """A 4xx answer other than throttling: the same request would be refused again."""
    return 400 <= (error.status or 0) < 500 and error.status != 429


def _server_message(error: ApiException) -> str:
    try:
        message = json.loads(error.body).get("message") or ""
    except (TypeError, ValueError, AttributeError):
        message = ""
    return _short(Exception(message or f"{error.status} {error.reason}"))


def _recent_rejections(namespace: str, jobs: list[dict]) -> dict[str, str]:
    """Refusals of the last resync interval, for Jobs that still do not exist."""
    existing = {job["metadata"]["name"] for job in jobs}
    now = time.monotonic()
    rejections = list(_rejections.items())  # a copy: other workers add and remove entries meanwhile
    for key, (at, _) in rejections:
        if now - at > SETTINGS.timer_seconds * 0.9:
            _rejections.pop(key, None)
    return {name: message for (ns, name), (at, message) in rejections
            if ns == namespace and name not in existing and now - at <= SETTINGS.timer_seconds * 0.9}


def _progress(namespace: str, bot: dict, jobs: list[dict]) -> Progress | None:
    """The running train stage's latest report, best effort: read only with an identity the bot may use,
    bounded in bytes and time, and never a reason for a pass to fail."""
    run_id = run_id_for(bot)
    if not any(job["metadata"]["labels"].get(STAGE_LABEL) == "train" and job["metadata"]["labels"].get(RUN_LABEL) == run_id
               and job_state(job) == "Running" for job in jobs):
        return None
    identity = s3_identity(bot, SETTINGS)
    if identity is None:
        return None
    try:
        credentials = _s3_credentials(namespace, bot) if identity == BOT_IDENTITY else None
        return read_progress(s3_layout(bot, run_id), credentials)
    except Exception as error:
        log.info("progress of %s/%s not read: %s", namespace, bot["metadata"]["name"], type(error).__name__)
        return None


def post_event(bot: dict, event_type: str, reason: str, message: str) -> None:
    """A core/v1 Event on the bot, posted by a thread of its own: a reconcile does not wait for it. Posted
    directly rather than with kopf.event, which works only inside kopf's own handler context."""
    _events.submit(_post_event, bot["apiVersion"], bot["kind"], dict(bot["metadata"]), event_type, reason, message)


def _post_event(api_version: str, kind: str, metadata: dict, event_type: str, reason: str, message: str) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        _kube.create(path("v1", "events", metadata["namespace"]), {
            "metadata": {"generateName": f"{metadata['name']}."},
            "involvedObject": {"apiVersion": api_version, "kind": kind, "name": metadata["name"],
                               "namespace": metadata["namespace"], "uid": metadata["uid"]},
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": "tweetbot-operator"}, "reportingComponent": "tweetbot-operator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })
    except Exception as error:  # an event is worth a log line, never a failed reconcile
        log.warning("event %s on %s/%s not posted: %s", reason, metadata["namespace"], metadata["name"],
                    getattr(error, "status", None) or type(error).__name__)


def _stage_results(namespace: str, bot: dict, jobs: list[dict]) -> dict[str, StageResult]:
    """Results of ended Jobs not yet recorded in status, from their pods' termination messages."""
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
        pods = _kube.items(path("v1", "pods", namespace), labelSelector=f"job-name={job_name}")
        wanted_phase = "Succeeded" if state == "Succeeded" else "Failed"
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True):
            if (pod.get("status") or {}).get("phase") != wanted_phase:
                continue
            pod_result = stage_result_from_pod(pod, job["metadata"]["labels"].get(STAGE_LABEL, ""))
            if pod_result is not None:
                results[job_name] = pod_result
                break
    return results


class SecretKeys(Mapping):
    """What the operator may know of each Secret of a namespace (None: no such Secret), read on first use:
    most passes create no Job and so read no Secret. Answers are shared for a few seconds, so a thousand bots
    naming one Secret read it once, not a thousand times. The values are never kept or logged."""

    TTL_SECONDS = 10.0
    MAX_SHARED = 4096
    _shared: dict[tuple[str, str], tuple[float, SecretView | None]] = {}
    _lock = threading.Lock()

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._views: dict[str, SecretView | None] = {}

    def __getitem__(self, name: str) -> SecretView | None:
        if name not in self._views:
            read_at, view = self._shared.get((self.namespace, name), (0.0, None))
            if time.monotonic() - read_at > self.TTL_SECONDS:
                view = self._read(name)
                self._remember(name, view)
            self._views[name] = view
        return self._views[name]

    def _remember(self, name: str, view: SecretView | None) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._shared) >= self.MAX_SHARED:  # what expired goes first, then the oldest
                for key in [key for key, (at, _) in self._shared.items() if now - at > self.TTL_SECONDS]:
                    del self._shared[key]
                while len(self._shared) >= self.MAX_SHARED:
                    del self._shared[min(self._shared, key=lambda key: self._shared[key][0])]
            self._shared[(self.namespace, name)] = (now, view)

    def _read(self, name: str) -> SecretView | None:
        try:
            return secret_view(_kube.get(path("v1", "secrets", self.namespace, name)))
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)


def _bot_jobs(selector: str = BOT_LABEL) -> Iterator[dict]:
    """The Jobs matching `selector` wherever the operator may list them (namespaced RBAC: only there)."""
    for namespace in SETTINGS.namespaces or (None,):
        yield from _kube.items(path("batch/v1", "jobs", namespace), labelSelector=selector)


def _active_trainings(exclude_bot: Key) -> int:
    return sum(
        1
        for job in _bot_jobs(f"{STAGE_LABEL}=train")
        if (job["metadata"]["namespace"], job["metadata"]["labels"].get(BOT_LABEL)) != exclude_bot
        and occupies_training_slot(job)
    )
