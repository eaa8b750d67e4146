"""The operator's metrics from the statuses it writes: gauges by namespace that follow the bots and leave with
them, a counter of GPU-seconds that counts each run once, and the build's version."""

from __future__ import annotations

import importlib.metadata
import platform
from datetime import datetime, timezone

from prometheus_client import REGISTRY

from tweetbot_operator import metrics

NS = "metrics-test"


def value(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def training(step_at: str, tokens: float, stalled: bool = False, **extra) -> dict:
    return {"phase": "Training", "progress": {"step": 10, "totalSteps": 100, "tokensPerSecond": tokens, "updatedAt": step_at},
            "stages": {"train": {"state": "Running", "startTime": "2026-12-03T09:00:00Z"}},
            "conditions": [{"type": "Stalled", "status": "True" if stalled else "False"}], **extra}


def unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()


def test_training_bots_sum_their_throughput_and_show_the_oldest_progress_by_namespace():
    metrics.observe(NS, "a", {}, training("2026-12-03T10:00:00Z", 1500.0))
    metrics.observe(NS, "b", {}, training("2026-12-03T10:05:00Z", 500.0))
    assert value("tweetbot_training_tokens_per_second", namespace=NS) == 2000.0
    assert value("tweetbot_training_progress_timestamp_seconds", namespace=NS) == unix("2026-12-03T10:00:00Z")
    metrics.observe(NS, "a", {}, training("2026-12-03T10:10:00Z", 1000.0))  # a moved
    assert value("tweetbot_training_progress_timestamp_seconds", namespace=NS) == unix("2026-12-03T10:05:00Z")
    metrics.observe(NS, "b", {}, {"phase": "Publishing"})  # b's training is over
    assert value("tweetbot_training_tokens_per_second", namespace=NS) == 1000.0
    assert value("tweetbot_training_progress_timestamp_seconds", namespace=NS) == unix("2026-12-03T10:10:00Z")
    metrics.forget(NS, "a")
    assert value("tweetbot_training_progress_timestamp_seconds", namespace=NS) is None  # nothing trains: no age to alert on
    metrics.forget(NS, "b")
    assert value("tweetbot_training_tokens_per_second", namespace=NS) is None  # the namespace's last bot went


def test_a_training_bot_without_a_report_yet_counts_from_its_train_job_s_start():
    status = training("", 0.0)
    del status["progress"]
    metrics.observe(NS, "fresh", {}, status)
    assert value("tweetbot_training_progress_timestamp_seconds", namespace=NS) == unix("2026-12-03T09:00:00Z")
    metrics.forget(NS, "fresh")


def test_stalled_and_failed_bots_are_counted():
    failed = value("tweetbot_bots", phase="Failed") or 0.0
    metrics.observe(NS, "stuck", {}, training("2026-12-03T10:00:00Z", 0.0, stalled=True))
    metrics.observe(NS, "broken", {}, {"phase": "Failed"})
    assert value("tweetbot_bots_stalled", namespace=NS) == 1
    assert value("tweetbot_bots", phase="Failed") == failed + 1
    metrics.observe(NS, "stuck", {}, training("2026-12-03T10:00:00Z", 0.0))
    assert value("tweetbot_bots_stalled", namespace=NS) == 0
    for name in ("stuck", "broken"):
        metrics.forget(NS, name)
    assert value("tweetbot_bots", phase="Failed") == failed


def test_a_run_s_gpu_seconds_are_counted_once():
    before = value("tweetbot_gpu_seconds_total", namespace=NS) or 0.0
    done = {"phase": "Publishing", "metrics": {"gpuSeconds": 120.5, "loss": 2.1}}
    metrics.observe(NS, "gpu", {"phase": "Training"}, done)
    metrics.observe(NS, "gpu", done, {**done, "phase": "Succeeded"})  # later passes: the same run's figure
    assert value("tweetbot_gpu_seconds_total", namespace=NS) == before + 120.5
    metrics.observe(NS, "gpu", {**done, "phase": "Succeeded"}, {"phase": "Pending", "metrics": None})  # a rerun
    metrics.observe(NS, "gpu", {"phase": "Training"}, {**done, "metrics": {"gpuSeconds": 60.0}})
    assert value("tweetbot_gpu_seconds_total", namespace=NS) == before + 180.5
    metrics.forget(NS, "gpu")


def test_build_info_names_the_installed_version():
    assert value("tweetbot_build_info", version=importlib.metadata.version("tweetbot"),
                 python_version=platform.python_version(), contract_version="1") == 1
