"""Prometheus metrics of the operator: bots by phase, stage durations, reconciles and their errors, the work
queue (as client-go's workqueue reports it), and per namespace what training costs and whether it moves.

Labels stay bounded: a phase, a stage, a namespace, the queue's name; never a bot's name (a thousand bots would
be a thousand series each). `forget` takes a deleted bot out of every gauge. The chart's dashboard and alerts
(charts/tweetbot-operator/dashboards, templates/prometheusrule.yaml) use these names only; tests/test_dashboards.py
holds them to this module.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tweetbot_trainer.contract import CONTRACT_VERSION, STAGES

from .jobs import parse_time
from .names import Condition, JobState, Phase

BOTS_BY_PHASE = Gauge("tweetbot_bots", "TweetBots by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "tweetbot_stage_duration_seconds", "Wall time of succeeded stage Jobs", ["stage"],
    buckets=(30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
)
RECONCILES = Counter("tweetbot_reconciles_total", "Reconciles of a TweetBot")
RECONCILE_ERRORS = Counter("tweetbot_reconcile_errors_total", "Reconciles that raised an error")

BOTS_STALLED = Gauge("tweetbot_bots_stalled", "TweetBots whose Stalled condition is True", ["namespace"])
GPU_SECONDS = Counter("tweetbot_gpu_seconds_total",
                      "GPU-seconds of finished training runs (status.metrics.gpuSeconds), counted as each run reports them",
                      ["namespace"])
TOKENS_PER_SECOND = Gauge("tweetbot_training_tokens_per_second",
                          "Training throughput of the bots in phase Training (status.progress.tokensPerSecond), summed",
                          ["namespace"])
PROGRESS_TIME = Gauge(
    "tweetbot_training_progress_timestamp_seconds",
    "Unix time of the oldest latest progress report among the bots in phase Training (the train Job's start "
    "until its first report): time() minus it is how long the slowest bot has not moved",
    ["namespace"],
)

# The work queue, by client-go's names (workqueue_depth, ..., with the queue's `name`). Buckets from 100µs to
# 1000s: a pass takes milliseconds to seconds, a wait behind a thousand bots minutes.
_QUEUE_BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000)
QUEUE_DEPTH = Gauge("tweetbot_workqueue_depth", "Bots waiting in the work queue", ["name"])
QUEUE_ADDS = Counter("tweetbot_workqueue_adds_total", "Bots put in the work queue (not already waiting)", ["name"])
QUEUE_WAIT = Histogram("tweetbot_workqueue_queue_duration_seconds", "How long a bot waited in the queue before a worker took it",
                       ["name"], buckets=_QUEUE_BUCKETS)
QUEUE_WORK = Histogram("tweetbot_workqueue_work_duration_seconds", "How long a worker took over one bot",
                       ["name"], buckets=_QUEUE_BUCKETS)
QUEUE_RETRIES = Counter("tweetbot_workqueue_retries_total", "Failed passes queued again after a delay", ["name"])


def _version() -> str:
    try:
        return importlib.metadata.version("tweetbot")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


BUILD_INFO = Gauge("tweetbot_build_info", "The operator's version; always 1",
                   ["version", "python_version", "contract_version"])
BUILD_INFO.labels(_version(), platform.python_version(), str(CONTRACT_VERSION)).set(1)


@dataclass(frozen=True)
class _Seen:
    """What the gauges need of one bot's latest status."""

    phase: str
    stalled: bool = False
    tokens_per_second: float = 0.0  # while training
    progress_at: float | None = None  # Unix time of its latest progress, while training


_bots: dict[tuple[str, str], _Seen] = {}
_namespaces: set[str] = set()  # namespaces with series in the gauges by namespace
_training: set[str] = set()  # ... and in PROGRESS_TIME
_lock = threading.Lock()


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def observe(namespace: str, name: str, old_status: dict, new_status: dict) -> None:
    seen = _seen(new_status)
    with _lock:
        if _bots.get((namespace, name)) != seen:  # most passes change nothing the gauges show: no walk over every bot
            _bots[(namespace, name)] = seen
            _publish()
    old_stages = old_status.get("stages") or {}
    for stage in STAGES:
        new = (new_status.get("stages") or {}).get(stage) or {}
        if new.get("state") == JobState.SUCCEEDED and (old_stages.get(stage) or {}).get("state") != JobState.SUCCEEDED:
            if new.get("startTime") and new.get("completionTime"):
                STAGE_SECONDS.labels(stage).observe((parse_time(new["completionTime"]) - parse_time(new["startTime"])).total_seconds())
    # A run's gpuSeconds appears once, with the train stage's result; a new run clears it before reporting its own.
    gpu_seconds = (new_status.get("metrics") or {}).get("gpuSeconds")
    if gpu_seconds and gpu_seconds > 0 and gpu_seconds != (old_status.get("metrics") or {}).get("gpuSeconds"):
        GPU_SECONDS.labels(namespace).inc(gpu_seconds)


def forget(namespace: str, name: str) -> None:
    with _lock:
        _bots.pop((namespace, name), None)
        _publish()


def _seen(status: dict) -> _Seen:
    phase = status.get("phase", Phase.PENDING)
    stalled = any(c.get("type") == Condition.STALLED and c.get("status") == "True" for c in status.get("conditions") or [])
    if phase != Phase.TRAINING:
        return _Seen(phase, stalled)
    progress = status.get("progress") or {}
    since = progress.get("updatedAt") or ((status.get("stages") or {}).get("train") or {}).get("startTime")
    return _Seen(phase, stalled, float(progress.get("tokensPerSecond") or 0.0),
                 parse_time(since).timestamp() if since else None)


def _publish() -> None:
    phases = dict.fromkeys(Phase, 0)
    stalled: dict[str, int] = {}
    tokens: dict[str, float] = {}
    progress: dict[str, float] = {}
    for (namespace, _), seen in _bots.items():
        if seen.phase in phases:
            phases[seen.phase] += 1
        stalled[namespace] = stalled.get(namespace, 0) + seen.stalled
        tokens[namespace] = tokens.get(namespace, 0.0) + seen.tokens_per_second
        if seen.progress_at is not None:
            progress[namespace] = min(progress.get(namespace, seen.progress_at), seen.progress_at)
    for phase, count in phases.items():
        BOTS_BY_PHASE.labels(phase).set(count)
    for namespace in _namespaces - stalled.keys():  # its last bot went
        BOTS_STALLED.remove(namespace)
        TOKENS_PER_SECOND.remove(namespace)
    for namespace in stalled:
        BOTS_STALLED.labels(namespace).set(stalled[namespace])
        TOKENS_PER_SECOND.labels(namespace).set(tokens[namespace])
    # No series while nothing trains: an alert on its age would otherwise fire on the last bot's old report.
    for namespace in _training - progress.keys():
        PROGRESS_TIME.remove(namespace)
    for namespace, at in progress.items():
        PROGRESS_TIME.labels(namespace).set(at)
    _namespaces.clear()
    _namespaces.update(stalled)
    _training.clear()
    _training.update(progress)
