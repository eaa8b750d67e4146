"""Prometheus metrics of the operator: bots by phase, stage durations, reconciles and their errors."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tweetbot_trainer.contract import STAGES

from .jobs import parse_time
from .names import JobState, Phase

BOTS_BY_PHASE = Gauge("tweetbot_bots", "TweetBots by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "tweetbot_stage_duration_seconds", "Wall time of succeeded stage Jobs", ["stage"],
    buckets=(30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
)
RECONCILES = Counter("tweetbot_reconciles_total", "Reconciles of a TweetBot")
RECONCILE_ERRORS = Counter("tweetbot_reconcile_errors_total", "Reconciles that raised an error")

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def observe(namespace: str, name: str, old_status: dict, new_status: dict) -> None:
    with _lock:
        _phases[(namespace, name)] = new_status.get("phase", Phase.PENDING)
        _publish_phases()
    old_stages = old_status.get("stages") or {}
    for stage in STAGES:
        new = (new_status.get("stages") or {}).get(stage) or {}
        if new.get("state") == JobState.SUCCEEDED and (old_stages.get(stage) or {}).get("state") != JobState.SUCCEEDED:
            if new.get("startTime") and new.get("completionTime"):
                STAGE_SECONDS.labels(stage).observe((parse_time(new["completionTime"]) - parse_time(new["startTime"])).total_seconds())


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _publish_phases()


def _publish_phases() -> None:
    for phase in Phase:
        BOTS_BY_PHASE.labels(phase).set(sum(1 for value in _phases.values() if value == phase))

