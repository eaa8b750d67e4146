"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A setting the operator cannot start with; the message names the variable and what is wrong."""


@dataclass(frozen=True)
class StageResources:
    cpu: str
    memory: str


@dataclass(frozen=True)
class Settings:
    trainer_image: str = "ghcr.io/huggingtweets/tweetbot-trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # Stage pods need no Kubernetes API rights: their own account, with no token mounted.
    trainer_service_account: str = ""
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    max_concurrent_trainings: int = 0  # 0: no limit of the operator's own (Kueue may still queue)
    max_gpus_per_node: int = 8  # spec.resources.gpus' bound: a pod asking for more would stay Pending forever
    # Whether a bot may run its stages in an image of its own (spec.podOverrides.<stage>.image): code the admin
    # did not choose, with the bot's Secrets in its environment.
    allow_bot_images: bool = False
    # S3 endpoints (scheme://host[:port]) a bot may name in spec.output.s3.endpoint; none: only AWS S3.
    s3_endpoints: tuple[str, ...] = ()
    # Buckets where the operator may use its own identity for a bot without credentialsSecretRef.
    s3_operator_buckets: tuple[str, ...] = ()
    # The chart's trainer.modelCache: the Kubernetes volume source (hostPath, nfs, csi, persistentVolumeClaim, ...)
    # the train pods share base-model downloads through; None: each pod downloads its own.
    model_cache_volume: dict | None = None
    scrape_resources: StageResources = field(default_factory=lambda: StageResources("500m", "1Gi"))
    publish_resources: StageResources = field(default_factory=lambda: StageResources("1", "4Gi"))
    timer_seconds: float = 60.0
    workers: int = 16  # reconciles at a time (each waits on the API server most of its time)
    metrics_port: int = 8080
    health_port: int = 8081

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def get(name: str, default):
            value = env.get(f"TWEETBOT_{name}")
            return default if value in (None, "") else type(default)(value)

        return cls(
            trainer_image=get("TRAINER_IMAGE", defaults.trainer_image),
            image_pull_policy=get("IMAGE_PULL_POLICY", defaults.image_pull_policy),
            trainer_service_account=get("TRAINER_SERVICE_ACCOUNT", defaults.trainer_service_account),
            namespaces=_list(env, "TWEETBOT_NAMESPACES"),
            s3_endpoints=tuple(endpoint.rstrip("/") for endpoint in _list(env, "TWEETBOT_S3_ENDPOINTS")),
            s3_operator_buckets=_list(env, "TWEETBOT_S3_OPERATOR_BUCKETS"),
            max_concurrent_trainings=get("MAX_CONCURRENT_TRAININGS", defaults.max_concurrent_trainings),
            max_gpus_per_node=get("MAX_GPUS_PER_NODE", defaults.max_gpus_per_node),
            allow_bot_images=env.get("TWEETBOT_ALLOW_BOT_IMAGES", "").strip().lower() == "true",
            model_cache_volume=_volume_source(env, "TWEETBOT_MODEL_CACHE_VOLUME"),
            scrape_resources=StageResources(
                get("SCRAPE_CPU", defaults.scrape_resources.cpu), get("SCRAPE_MEMORY", defaults.scrape_resources.memory)
            ),
            publish_resources=StageResources(
                get("PUBLISH_CPU", defaults.publish_resources.cpu), get("PUBLISH_MEMORY", defaults.publish_resources.memory)
            ),
            timer_seconds=get("TIMER_SECONDS", defaults.timer_seconds),
            workers=get("WORKERS", defaults.workers),
            metrics_port=get("METRICS_PORT", defaults.metrics_port),
            health_port=get("HEALTH_PORT", defaults.health_port),
        )


def _list(env, name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _volume_source(env, name: str) -> dict | None:
    """A pod volume's source as JSON ({"nfs": {...}}, the volume less its name), or None when unset. A wrong one
    stops the operator at start-up: every train pod it created would be refused by the API server."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        source = json.loads(text)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{name} is not JSON ({error.msg}): want one volume source, e.g. "
                            '{"hostPath": {"path": "/var/cache/tweetbot/models"}}') from None
    if not isinstance(source, dict) or len(source) != 1:
        raise SettingsError(f"{name} must name exactly one volume source (hostPath, nfs, csi, persistentVolumeClaim, "
                            f"...), not {text[:200]}")
    [(kind, value)] = source.items()
    if kind == "name" or not re.fullmatch(r"[a-z][A-Za-z]*", kind):
        raise SettingsError(f"{name}: {kind!r} is not a volume source (the operator names the volume itself)")
    if not isinstance(value, dict):
        raise SettingsError(f"{name}: the {kind} source must be an object, not {json.dumps(value)[:200]}")
    return source
