"""The controller: one object built from its dependencies, so its decisions run in unit tests with fakes.

Every trigger (a bot's event, one of its Jobs changing, the slow resync, a timed requeue, a retry) queues
the bot, and a worker runs the same level-based pass: read what exists (from the watch cache, or the API
server when `fresh`), `plan`, read what the plan asks for and plan again, then apply the plan. A missed
event costs at most one resync interval.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Protocol

from kubernetes.client.rest import ApiException

from tweetbot_trainer.contract import BOT_LABEL, STAGE_LABEL, Progress, S3Layout, StageResult

from . import metrics
from .cache import Key, WatchCache
from .jobs import (KUEUE_JOB_UID_LABEL, admission_message, job_fingerprint, job_state, occupies_training_slot,
                   stage_result_from_pod)
from .kube import path
from .names import BOTS, FINISHED, KIND, PLURAL, JobState, Reason
from .plan import Needs, Observed, Plan, plan, status_patch
from .settings import Settings
from .spec import BOT_IDENTITY, SECRET_OPT_IN_LABEL, InvalidSpec, SecretView, rerun_requested, run_id_for, s3_identity, s3_layout, secret_view, validate_spec
from .stages import headless_service
from .workqueue import NEW, UPDATE, Request, WorkQueue

log = logging.getLogger("tweetbot.operator")
MAX_PLANS = 5  # a pass plans at most this often: each plan asks for one kind of read
DELETION_SECONDS = 60


class KubeApi(Protocol):
    """What the controller asks of the API server (`kube.Kube`, or a fake in unit tests)."""

    def get(self, path: str, **query) -> dict: ...
    def items(self, path: str, **query) -> Iterator[dict]: ...
    def create(self, path: str, body: dict) -> dict: ...
    def merge_patch(self, path: str, body: dict) -> dict: ...
    def delete(self, path: str, body: dict | None = None) -> dict: ...


class ArtifactStore(Protocol):
    """The operator's S3 reads and deletions (`artifacts`, or a fake)."""

    def read_progress(self, layout: S3Layout, credentials: dict[str, str] | None) -> Progress | None: ...
    def delete_artifacts(self, layouts: list[S3Layout], credentials: dict[str, str] | None, deadline_seconds: float) -> int: ...


class ArtifactsLeft(Exception):
    """Deleting a bot's artifacts did not finish; the finalizer stays and the deletion is tried again."""


def schedule(delay: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.start()


class Controller:
    def __init__(self, kube: KubeApi, settings: Settings, artifacts: ArtifactStore, *,
                 cache: WatchCache | None = None, queue: WorkQueue | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 later: Callable[[float, Callable[[], None]], None] = schedule,
                 events: Callable[[dict, str, str, str], None] | None = None):
        self.kube, self.settings, self.artifacts = kube, settings, artifacts
        self.cache = cache or WatchCache()
        # 4 of 16 workers for passes over running bots: new bots' first Jobs are not kept waiting.
        self.queue = queue or WorkQueue(max_updates=max(1, settings.workers // 4))
        self.clock, self.now, self.later = clock, now, later
        self.post_event = events or EventPoster(kube).post
        self.secrets = SecretCache(kube, clock)
        # The resourceVersions our latest writes gave each bot: events carrying them bring nothing new.
        self._own_versions: defaultdict[Key, deque[str]] = defaultdict(lambda: deque(maxlen=4))
        self._last_reconciled: dict[Key, float] = {}  # clock time of each bot's last full pass
        self._failures: dict[Key, int] = {}  # consecutive failed passes of each bot
        self._deletion_errors: dict[Key, str] = {}  # the last ArtifactsLeft message of each bot, posted once
        self._requeues: dict[Key, float] = {}  # when each bot's next timed pass is due
        self._rejections: dict[Key, tuple[float, str]] = {}  # Jobs the API server refused: when, and its message
        self._job_fingerprints: dict[Key, tuple] = {}  # what the last pass knew of each Job
        self._kueue_version = KUEUE_VERSIONS[0]  # the Workload API version that last answered
        self._gang_services: set[str] = set()  # uids of the unfinished gang Jobs whose Service is known to exist

    # --- triggers ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Fill the cache with the Jobs that exist, so no pass starts from an empty picture, and start the workers."""
        for job in self._bot_jobs(BOT_LABEL):
            self.cache.put_job(job)
        for number in range(self.settings.workers):
            threading.Thread(target=self.work, name=f"reconcile-{number}", daemon=True).start()

    def bot_event(self, event_type: str, bot: dict) -> None:
        key = (bot["metadata"]["namespace"], bot["metadata"]["name"])
        if event_type == "DELETED":  # its Jobs and pods go with it through owner references
            metrics.forget(*key)
            for state in (self._own_versions, self._last_reconciled, self._failures, self._deletion_errors, self._requeues):
                state.pop(key, None)
            self.cache.forget_bot(key)
            return
        self.cache.put_bot(bot)
        self.queue.add(key, Request(priority=UPDATE if bot.get("status") else NEW,
                                    echo_of=bot["metadata"].get("resourceVersion")))

    def job_event(self, event_type: str, job: dict) -> None:
        """Most Job updates (ready counts, pod bookkeeping) change nothing the bot's status is made of."""
        metadata = job["metadata"]
        key = (metadata["namespace"], metadata["name"])
        if event_type == "DELETED":
            self._job_fingerprints.pop(key, None)
            self._gang_services.discard(metadata.get("uid"))
            self.cache.forget_job(job)
        else:
            self.cache.put_job(job)
            fingerprint = job_fingerprint(job)
            if self._job_fingerprints.get(key) == fingerprint:
                return
            self._job_fingerprints[key] = fingerprint
        self.queue.add((metadata["namespace"], metadata["labels"][BOT_LABEL]))

    def resync(self) -> None:
        """Queue every unfinished bot not reconciled within the interval: for what sends no event (a Secret
        created later, a lost watch, training progress in S3)."""
        for key in self._unfinished_bots():
            if self.clock() - self._last_reconciled.get(key, 0.0) >= self.settings.timer_seconds * 0.9:
                self.queue.add(key, Request(fresh=True))

    def work(self) -> None:
        while (item := self.queue.get()) is not None:
            key, request = item
            try:
                self.reconcile(key, request)
            finally:
                self.queue.done(key)

    # --- one pass ---------------------------------------------------------------------------------

    def reconcile(self, key: Key, request: Request = Request()) -> None:
        """One pass over one bot (the queue hands a bot to one worker at a time).

        An event carrying the resourceVersion our own write gave the bot is its echo: nothing new (checked
        here, not in the handler, since the watch may deliver the echo before the write returns).
        """
        if request.echo_of is not None and request.echo_of in self._own_versions[key]:
            return
        try:
            for attempt in range(3):
                try:
                    self._pass(key, fresh=request.fresh or attempt > 0)
                    break
                except ApiException as error:
                    if error.status != 409 or attempt == 2:
                        raise  # 409: someone wrote the bot between our read and our write: read again
            self._failures.pop(key, None)
        except Exception as error:
            # Watch events are not redelivered: retry with a growing delay, capped at the resync interval.
            metrics.RECONCILE_ERRORS.inc()
            metrics.QUEUE_RETRIES.labels(self.queue.name).inc()
            self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(self.settings.timer_seconds, 2.0 ** self._failures[key])
            reason = f"API answered {error.status} {error.reason}" if isinstance(error, ApiException) else _short(error)
            log.warning("reconcile of %s/%s failed (%s: %s); retrying in %.0fs", *key, type(error).__name__, reason, delay)
            self.later(delay, lambda: self.queue.add(key, Request(fresh=True)))

    def _pass(self, key: Key, fresh: bool) -> None:
        bot = self._read_bot(key, fresh)
        if bot is None:
            return
        jobs = self._read_jobs(key, fresh) if not bot["metadata"].get("deletionTimestamp") else []
        observed = Observed(jobs=jobs, rejected=self._recent_rejections(key[0], jobs))
        decided = self._plan(bot, observed)
        if decided.delete_artifacts:
            self._delete_artifacts(bot)
        if decided.finalizers is not None:
            bot = self._write_bot(bot, path(BOTS, PLURAL, key[0], key[1]), metadata={"finalizers": decided.finalizers})
        if decided.status is None:
            return
        metrics.RECONCILES.inc()
        self._delete_jobs(key[0], jobs, decided.delete)
        self._ensure_services([job for job in jobs if job["metadata"]["name"] not in decided.delete])
        if decided.create and not self._create_jobs(bot, decided.create, defer=decided.first_job_only):
            observed.rejected = self._recent_rejections(key[0], jobs)
            decided = self._plan(bot, observed)
        elif decided.first_job_only:
            self._last_reconciled[key] = self.clock()
            return
        old_status = bot.get("status") or {}
        patch = status_patch(old_status, decided.status)
        if patch:  # after a concurrent write: 409, and `reconcile` reads the bot again
            self._write_bot(bot, path(BOTS, PLURAL, key[0], key[1], "status"), status=patch)
        for event_type, reason, message in decided.events:
            self.post_event(bot, event_type, reason, message)
        metrics.observe(*key, old_status, decided.status)
        self._last_reconciled[key] = self.clock()
        if decided.requeue_after is not None:
            self._requeue(key, decided.requeue_after)

    def _plan(self, bot: dict, observed: Observed) -> Plan:
        """Plan, reading what the plan asks for, until it has all it needs."""
        for _ in range(MAX_PLANS):
            decided = plan(bot, observed, self.settings, self.now())
            if not decided.needs:
                return decided
            self._read(bot, decided.needs, observed)
        raise RuntimeError(f"the plan still needed {decided.needs} after {MAX_PLANS} rounds of reads")

    def _read(self, bot: dict, needs: Needs, observed: Observed) -> None:
        namespace = bot["metadata"]["namespace"]
        if needs.secrets:
            observed.secrets = {**observed.secrets, **{name: self.secrets.view(namespace, name) for name in needs.secrets}}
        if needs.results:
            jobs = {job["metadata"]["name"]: job for job in observed.jobs}
            observed.results = {**observed.results, **{name: self._stage_result(jobs[name]) for name in needs.results}}
        if needs.progress:
            observed.progress = self._progress(bot)
        if needs.training_slots:
            observed.other_active_trainings = self._active_trainings(exclude_bot=(namespace, bot["metadata"]["name"]))
        if needs.admission:
            jobs = {job["metadata"]["name"]: job for job in observed.jobs}
            observed.admission = {**observed.admission, **{name: self._admission(jobs[name]) for name in needs.admission}}

    # --- reads ------------------------------------------------------------------------------------

    def _read_bot(self, key: Key, fresh: bool) -> dict | None:
        bot = None if fresh else self.cache.bot(key)
        if bot is None:
            try:
                bot = self.kube.get(path(BOTS, PLURAL, *key))
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            self.cache.put_bot(bot)
        return bot

    def _read_jobs(self, key: Key, fresh: bool) -> list[dict]:
        if not fresh:
            return self.cache.jobs(key)
        jobs = list(self.kube.items(path("batch/v1", "jobs", key[0]), labelSelector=f"{BOT_LABEL}={key[1]}"))
        self.cache.replace_jobs(key, jobs)
        return jobs

    def _stage_result(self, job: dict) -> StageResult | None:
        """What the Job's newest pod of its outcome reported in its termination message."""
        metadata = job["metadata"]
        wanted_phase = "Succeeded" if job_state(job) == JobState.SUCCEEDED else "Failed"
        pods = self.kube.items(path("v1", "pods", metadata["namespace"]), labelSelector=f"job-name={metadata['name']}")
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True):
            if (pod.get("status") or {}).get("phase") == wanted_phase:
                result = stage_result_from_pod(pod, metadata["labels"].get(STAGE_LABEL, ""))
                if result is not None:
                    return result
        return None

    def _admission(self, job: dict) -> str | None:
        """Why Kueue keeps a queued Job waiting, from its Workloads (none: no Kueue, or not allowed to read them)."""
        for version in sorted(KUEUE_VERSIONS, key=lambda version: version != self._kueue_version):
            try:
                workloads = list(self.kube.items(path(version, "workloads", job["metadata"]["namespace"]),
                                                 labelSelector=f"{KUEUE_JOB_UID_LABEL}={job['metadata']['uid']}"))
            except ApiException as error:
                if error.status in (403, 404):
                    continue
                raise
            self._kueue_version = version  # asked first from now on
            return admission_message(workloads)
        return None

    def _progress(self, bot: dict) -> Progress | None:
        """Best effort: bounded in bytes and time, and never a reason for a pass to fail."""
        try:
            credentials = self._s3_credentials(bot) if s3_identity(bot, self.settings) == BOT_IDENTITY else None
            return self.artifacts.read_progress(s3_layout(bot, run_id_for(bot)), credentials)
        except Exception as error:
            log.info("progress of %s/%s not read: %s", bot["metadata"]["namespace"], bot["metadata"]["name"],
                     type(error).__name__)
            return None

    def _s3_credentials(self, bot: dict) -> dict[str, str] | None:
        """The bot's S3 keys from its Secret if it opted in, or None to use the operator's own identity (only
        where `s3_identity` allows it)."""
        ref = bot["spec"]["output"]["s3"].get("credentialsSecretRef")
        if not ref:
            return None
        secret = self.kube.get(path("v1", "secrets", bot["metadata"]["namespace"], ref["name"]))
        if not secret_view(secret).opted_in:
            raise InvalidSpec(f"Secret {ref['name']!r} is not labelled {SECRET_OPT_IN_LABEL}=true")
        return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}

    def _bot_jobs(self, selector: str) -> Iterator[dict]:
        """The Jobs matching `selector` wherever the operator may list them (namespaced RBAC: only there)."""
        for namespace in self.settings.namespaces or (None,):
            yield from self.kube.items(path("batch/v1", "jobs", namespace), labelSelector=selector)

    def _active_trainings(self, exclude_bot: Key) -> int:
        return sum(1 for job in self._bot_jobs(f"{STAGE_LABEL}=train")
                   if (job["metadata"]["namespace"], job["metadata"]["labels"].get(BOT_LABEL)) != exclude_bot
                   and occupies_training_slot(job))

    def _unfinished_bots(self) -> list[Key]:
        bots = (bot for namespace in self.settings.namespaces or (None,) for bot in self.kube.items(path(BOTS, PLURAL, namespace)))
        return [(bot["metadata"]["namespace"], bot["metadata"]["name"]) for bot in bots
                if (bot.get("status") or {}).get("phase") not in FINISHED
                or bot["status"].get("observedGeneration") != bot["metadata"].get("generation")
                or bot["status"].get("rerun", "") != rerun_requested(bot)]

    # --- writes -----------------------------------------------------------------------------------

    def _write_bot(self, bot: dict, url: str, metadata: dict | None = None, status: dict | None = None) -> dict:
        """A merge patch of the bot that is refused (409) if the bot changed since `bot` was read. Its result
        goes into the cache, and its resourceVersion is remembered so that the watch's echo starts no pass."""
        body = {"metadata": {**(metadata or {}), "resourceVersion": bot["metadata"]["resourceVersion"]}}
        if status is not None:
            body["status"] = status
        written = self.kube.merge_patch(url, body)
        self._own_versions[(bot["metadata"]["namespace"], bot["metadata"]["name"])].append(written["metadata"]["resourceVersion"])
        self.cache.put_bot(written)
        return written

    def _delete_jobs(self, namespace: str, jobs: list[dict], names: list[str]) -> None:
        for name in names:
            try:
                self.kube.delete(path("batch/v1", "jobs", namespace, name), {"propagationPolicy": "Background"})
            except ApiException as error:
                if error.status != 404:
                    raise
            self.cache.forget_job(next(job for job in jobs if job["metadata"]["name"] == name))

    def _create_jobs(self, bot: dict, manifests: list[dict], defer: bool) -> bool:
        """Create the Jobs; False if the pass must plan again and write the status: the API server refused a
        Job for good (the plan says so), or a new bot's first Job was already there."""
        namespace = bot["metadata"]["namespace"]
        for manifest in manifests:
            manifest["metadata"]["ownerReferences"] = [owner_reference(bot)]
            job_key = (namespace, manifest["metadata"]["name"])
            if not defer:
                # This pass writes the new Job's state into the status: its ADDED event (which may arrive
                # before the create call returns) brings nothing new.
                self._job_fingerprints[job_key] = job_fingerprint(manifest)
            try:
                created = self.kube.create(path("batch/v1", "jobs", namespace), manifest)
                self.cache.put_job(created)
            except ApiException as error:
                self._job_fingerprints.pop(job_key, None)
                if not _refused(error):
                    raise
                if error.status == 409 and defer:
                    return False  # already there, and its ADDED event may be long gone: record it now
                if error.status != 409:
                    # Retrying will not help before something changes (the spec, a quota, a policy): say so
                    # in the status at once, and try again at the next resync.
                    self._rejections[job_key] = (self.clock(), _server_message(error))
                    return False
                created = None
            self._create_service(manifest, created)
        return True

    def _ensure_services(self, jobs: list[dict]) -> None:
        """The Service of every unfinished gang Job, in case the pass that created the Job did not get to it (the
        operator stopped, the API server refused): its pods would wait for a name that never resolves."""
        for job in jobs:
            if job["metadata"].get("uid") not in self._gang_services and job_state(job) not in (JobState.SUCCEEDED, JobState.FAILED):
                self._create_service(job, job)

    def _create_service(self, manifest: dict, job: dict | None) -> None:
        """A gang's headless Service, owned by its Job (read again if an earlier pass created the Job)."""
        service = headless_service(manifest)
        if service is None:
            return
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        job = job or self.kube.get(path("batch/v1", "jobs", namespace, name))
        owners = [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}]
        service["metadata"]["ownerReferences"] = owners
        for _ in range(3):
            try:
                self.kube.create(path("v1", "services", namespace), service)
                break
            except ApiException as error:
                if error.status != 409:
                    raise
            # A restarted gang's Job has its predecessor's name, and so had the Service: take it over before the
            # garbage collector deletes it with the old Job (404: it just did, create it again).
            try:
                existing = self.kube.get(path("v1", "services", namespace, name))
                if [owner.get("uid") for owner in existing["metadata"].get("ownerReferences") or []] == [owners[0]["uid"]]:
                    break
                self.kube.merge_patch(path("v1", "services", namespace, name), {"metadata": {
                    "ownerReferences": owners, "resourceVersion": existing["metadata"]["resourceVersion"]}})
                break
            except ApiException as error:
                if error.status not in (404, 409):
                    raise
        else:
            raise RuntimeError(f"the Service {namespace}/{name} changed under every attempt to create it")
        self._gang_services.add(job["metadata"]["uid"])

    def _recent_rejections(self, namespace: str, jobs: list[dict]) -> dict[str, str]:
        """Refusals of the last resync interval, for Jobs that still do not exist."""
        existing = {job["metadata"]["name"] for job in jobs}
        now, window = self.clock(), self.settings.timer_seconds * 0.9
        rejections = list(self._rejections.items())  # a copy: other workers add and remove entries meanwhile
        for key, (at, _) in rejections:
            if now - at > window:
                self._rejections.pop(key, None)
        return {name: message for (ns, name), (at, message) in rejections
                if ns == namespace and name not in existing and now - at <= window}

    def _requeue(self, key: Key, seconds: float) -> None:
        """Reconcile the bot again in `seconds`, unless an earlier pass is already due: finished bots get no
        resync, and a finished Job's TTL must still be applied."""
        now = self.clock()
        previous = self._requeues.get(key)
        if previous is not None and now < previous <= now + seconds:
            return
        self._requeues[key] = now + seconds
        self.later(seconds, lambda: self.queue.add(key, Request()))

    def _delete_artifacts(self, bot: dict) -> None:
        """Delete exactly the runs this bot recorded, or raise ArtifactsLeft saying what is left and the way out."""
        key = (bot["metadata"]["namespace"], bot["metadata"]["name"])
        status = bot.get("status") or {}
        runs = list(dict.fromkeys([*(status.get("runs") or []), status.get("runId") or run_id_for(bot)]))
        layouts = [s3_layout(bot, run) for run in runs]
        where = f"s3://{layouts[0].bucket}/{layouts[0].bot_prefix}/"
        try:
            validate_spec(bot, self.settings)  # the endpoint, bucket and identity as they are allowed now
            deleted = self.artifacts.delete_artifacts(layouts, self._s3_credentials(bot), deadline_seconds=DELETION_SECONDS)
        except Exception as error:  # never a credential: messages are the API's, S3's error codes or our own
            message = (f"could not delete the runs {', '.join(runs)} under {where}: {type(error).__name__}: "
                       f"{_short(error)}; the bot stays until they are deleted or spec.deletionPolicy is set to Retain")
            if self._deletion_errors.get(key) != message:
                self._deletion_errors[key] = message
                self.post_event(bot, "Warning", Reason.ARTIFACTS_LEFT, message)
            raise ArtifactsLeft(message) from None
        self._deletion_errors.pop(key, None)
        self.post_event(bot, "Normal", Reason.ARTIFACTS_DELETED, f"deleted {deleted} objects of {len(runs)} run(s) under {where}")


# Kueue's Workload API: v1beta2 in recent releases, v1beta1 in older ones.
KUEUE_VERSIONS = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")


def owner_reference(bot: dict) -> dict:
    """The bot controls the Job: the garbage collector deletes the Job (and its pods) with the bot."""
    return {"apiVersion": bot["apiVersion"], "kind": KIND, "name": bot["metadata"]["name"],
            "uid": bot["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


class SecretCache:
    """What the operator may know of each Secret (None: no such Secret), shared for a few seconds, so a
    thousand bots naming one Secret read it once, not a thousand times. The values are never kept or logged."""

    TTL_SECONDS = 10.0
    MAX_SHARED = 4096

    def __init__(self, kube: KubeApi, clock: Callable[[], float]):
        self.kube, self.clock = kube, clock
        self._shared: dict[Key, tuple[float, SecretView | None]] = {}
        self._lock = threading.Lock()

    def view(self, namespace: str, name: str) -> SecretView | None:
        read_at, view = self._shared.get((namespace, name), (None, None))
        if read_at is None or self.clock() - read_at > self.TTL_SECONDS:
            view = self._read(namespace, name)
            self._remember((namespace, name), view)
        return view

    def _remember(self, key: Key, view: SecretView | None) -> None:
        now = self.clock()
        with self._lock:
            if len(self._shared) >= self.MAX_SHARED:  # what expired goes first, then the oldest
                for old in [old for old, (at, _) in self._shared.items() if now - at > self.TTL_SECONDS]:
                    del self._shared[old]
                while len(self._shared) >= self.MAX_SHARED:
                    del self._shared[min(self._shared, key=lambda old: self._shared[old][0])]
            self._shared[key] = (now, view)

    def _read(self, namespace: str, name: str) -> SecretView | None:
        try:
            return secret_view(self.kube.get(path("v1", "secrets", namespace, name)))
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def __len__(self) -> int:
        return len(self._shared)


class EventPoster:
    """core/v1 Events on a bot, posted by a thread of their own: a reconcile does not wait for them."""

    def __init__(self, kube: KubeApi):
        self.kube = kube
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")

    def post(self, bot: dict, event_type: str, reason: str, message: str) -> None:
        self._pool.submit(self._post, bot["apiVersion"], bot["kind"], dict(bot["metadata"]), event_type, reason, message)

    def _post(self, api_version: str, kind: str, metadata: dict, event_type: str, reason: str, message: str) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.kube.create(path("v1", "events", metadata["namespace"]), {
                "metadata": {"generateName": f"{metadata['name']}."},
                "involvedObject": {"apiVersion": api_version, "kind": kind, "name": metadata["name"],
                                   "namespace": metadata["namespace"], "uid": metadata["uid"]},
                "type": event_type, "reason": str(reason), "message": message[:1024],
                "source": {"component": "tweetbot-operator"}, "reportingComponent": "tweetbot-operator",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            })
        except Exception as error:  # an event is worth a log line, never a failed reconcile
            log.warning("event %s on %s/%s not posted: %s", reason, metadata["namespace"], metadata["name"],
                        getattr(error, "status", None) or type(error).__name__)


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:297] + "..."


def _refused(error: ApiException) -> bool:
    """A 4xx answer other than throttling: the same request would be refused again."""
    return 400 <= (error.status or 0) < 500 and error.status != 429


def _server_message(error: ApiException) -> str:
    try:
        message = json.loads(error.body).get("message") or ""
    except (TypeError, ValueError, AttributeError):
        message = ""
    return _short(Exception(message or f"{error.status} {error.reason}"))
