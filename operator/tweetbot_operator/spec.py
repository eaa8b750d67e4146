"""A TweetBot's spec: what the operator checks beyond the schema, the run it names, where its artifacts go
and whose S3 identity the operator may use for it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from tweetbot_trainer.contract import (
    ALLOWED_ENV_PREFIXES,
    GROUP,
    MAX_HANDLES,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    SPEC_DEFAULTS,
    STAGES,
    TRACKERS,
    S3Layout,
    env_allowed,
    env_reserved,
)

from . import schedule
from .names import RERUN_ANNOTATION  # noqa: F401 (spec's callers import it from here too)
from .settings import Settings

# A Secret a TweetBot may name carries this label: without the opt-in, anyone allowed to create TweetBots
# could send any Secret of the namespace to a host of their choosing.
SECRET_OPT_IN_LABEL = f"{GROUP}/usable-by-tweetbots"

# What the API server accepts, checked again here because the CRD in the cluster may be older than the operator.
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9!_.*'()-]{0,127}")  # one key segment: the layout stays injective
REGION = re.compile(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?")
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one ref segment: no '/', so never refs/... or a path
# Hosts the train pod sends a tracker's key to: no userinfo, query or fragment to smuggle another host in.
WANDB_HOST = re.compile(r"https?://[^\s/@?#]+/?")
MLFLOW_URI = re.compile(r"https?://[^\s/@?#]+(/[^\s?#]*)?")
TRACKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
QUALIFIED_NAME = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
# An extended resource: a domain of at least two labels (not Kubernetes' own) and a name: nvidia.com/gpu,
# nvidia.com/mig-1g.10gb, amd.com/gpu, gpu.intel.com/i915.
EXTENDED_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/"
                               r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")

# The labels the operator puts on its Jobs and pods, which the chart's NetworkPolicies, Kueue and the Job
# controller select by: spec.podOverrides may not set them (nor annotations of the operator's group or the Job
# controller's). The CRD's rules list the same (tests hold them to it).
OPERATOR_LABEL_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by",
                       "job-name", "controller-uid")
OPERATOR_LABEL_PREFIXES = (f"{GROUP}/", "kueue.x-k8s.io/", "batch.kubernetes.io/")
OPERATOR_ANNOTATION_PREFIXES = (f"{GROUP}/", "batch.kubernetes.io/")


class InvalidSpec(ValueError):
    """Input the schema cannot catch; the message says what to fix."""


def with_defaults(bot: dict) -> dict:
    """The bot's spec with the CRD's defaults filled in, for a cluster whose CRD is older than the operator."""
    return SPEC_DEFAULTS.apply(bot["spec"])


def normalize_handles(handles: list[str]) -> list[str]:
    normalized = [handle.strip().removeprefix("@").lower() for handle in handles]
    if not 1 <= len(normalized) <= MAX_HANDLES:
        raise InvalidSpec(f"spec.handles must list 1 to {MAX_HANDLES} handles, got {len(normalized)}")
    duplicates = sorted({h for h in normalized if normalized.count(h) > 1})
    if duplicates:
        raise InvalidSpec(f"spec.handles lists {', '.join(duplicates)} more than once")
    return normalized


def _object_refs(value, where: str):
    """Every (path, ref) of a Secret or ConfigMap reference in a spec."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith(("SecretRef", "configMapRef")) and isinstance(item, dict):
                yield f"{where}.{key}", item
            else:
                yield from _object_refs(item, f"{where}.{key}")


def validate_spec(bot: dict, settings: Settings) -> None:
    """What the schema cannot know (the operator's settings) or a cluster's older CRD may not check."""
    spec = with_defaults(bot)
    normalize_handles(spec["handles"])
    for where, ref in _object_refs(spec, "spec"):
        name, key = ref.get("name", ""), ref.get("key")  # credentialsSecretRef names no key: it uses two
        if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
            raise InvalidSpec(f"{where}.name {name!r} is not a Kubernetes object name (a DNS subdomain)")
        if key is not None and (not isinstance(key, str) or len(key) > 253 or not CONFIG_KEY.fullmatch(key)):
            raise InvalidSpec(f"{where}.key {key!r} is not a Secret or ConfigMap key")
    s3 = spec["output"]["s3"]
    checks = (("bucket", s3["bucket"], BUCKET, "an S3 bucket name"),
              ("prefix", s3["prefix"], PREFIX, "one key segment (letters, digits, !_.*'()-; no '/')"),
              ("region", s3["region"], REGION, "a region name (lower-case letters, digits, '-')"))
    for field_name, value, pattern, what in checks:
        if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
            raise InvalidSpec(f"spec.output.s3.{field_name} {value!r} must be {what}")
    endpoint = s3.get("endpoint", "")
    if endpoint and endpoint.rstrip("/") not in settings.s3_endpoints:
        allowed = ", ".join(settings.s3_endpoints) or "none: only AWS S3"
        raise InvalidSpec(f"spec.output.s3.endpoint {endpoint!r} is not an S3 endpoint this operator may use "
                          f"(allowed: {allowed}; the chart's s3.endpoints)")
    if spec["deletionPolicy"] == "Delete" and s3_identity(bot, settings) is None:
        raise InvalidSpec("deletionPolicy Delete needs spec.output.s3.credentialsSecretRef: the operator deletes "
                          "with the bot's own credentials, and with its own identity only in the chart's "
                          "s3.operatorBuckets")
    branch = (spec["output"].get("hub") or {}).get("checkpointBranch", "checkpoints")
    if (not isinstance(branch, str) or not BRANCH.fullmatch(branch) or ".." in branch or branch.endswith((".", ".lock"))
            or branch == "main"):
        raise InvalidSpec(f"spec.output.hub.checkpointBranch {branch!r} must be a git branch name (letters, digits, "
                          "'.', '_', '-'; no '..', not ending in '.' or '.lock') other than main, which holds the "
                          "published model")
    validate_trackers(spec["training"])
    if spec.get("schedule"):
        try:
            schedule.check(spec["schedule"])
        except ValueError as error:
            raise InvalidSpec(str(error)) from None
    gpus, most = spec["resources"]["gpus"], settings.max_gpus_per_node
    if gpus > most:
        raise InvalidSpec(f"spec.resources.gpus {gpus} is more than a node of this cluster holds ({most}, the chart's "
                          "trainer.maxGpusPerNode): ask for fewer per pod and more spec.resources.nodes")
    priority_class = spec["resources"].get("priorityClassName")
    if priority_class is not None and not DNS_SUBDOMAIN.fullmatch(priority_class):
        raise InvalidSpec(f"spec.resources.priorityClassName {priority_class!r} is not a DNS subdomain")
    for stage in STAGES:
        validate_pod_override(stage, spec["podOverrides"].get(stage) or {}, settings)


def operator_label(key: str) -> bool:
    return key in OPERATOR_LABEL_KEYS or key.startswith(OPERATOR_LABEL_PREFIXES)


def validate_pod_override(stage: str, override: dict, settings: Settings) -> None:
    """spec.podOverrides.<stage>: what the chart's settings decide (a bot's own image) and the names the operator
    keeps for itself, besides the schema's patterns again."""
    where = f"spec.podOverrides.{stage}"
    if "image" in override:
        if not settings.allow_bot_images:
            raise InvalidSpec(f"{where}.image: this operator runs its stages in its own trainer image only (the "
                              "chart's trainer.allowBotImages is false); remove image, or ask the admin to allow it")
        image = override["image"]
        if not isinstance(image, str) or len(image) > 512 or not IMAGE.fullmatch(image):
            raise InvalidSpec(f"{where}.image {image!r} is not an image reference")
    names = []
    for item in override.get("env") or []:
        if not isinstance(item, dict) or set(item) - {"name", "value"}:
            raise InvalidSpec(f"{where}.env: each item has only name and value (a secret goes through the spec's "
                              "...SecretRef fields)")
        name = item.get("name")
        if not isinstance(name, str) or len(name) > 256 or not ENV_NAME.fullmatch(name):
            raise InvalidSpec(f"{where}.env {name!r} is not an environment variable name")
        if env_reserved(name):
            raise InvalidSpec(f"{where}.env {name!r} is set by the operator (it keeps every name starting with "
                              f"{', '.join(RESERVED_ENV_PREFIXES)} and {', '.join(RESERVED_ENV_NAMES)})")
        if not env_allowed(name):
            families = ", ".join(prefix + "*" for prefix in ALLOWED_ENV_PREFIXES)
            raise InvalidSpec(f"{where}.env {name!r} is not a variable a stage may be given (allowed: {families} "
                              "except names of a file, directory, library, plugin, command or host, and the tuning "
                              "variables docs/user-guide.md#pod-overrides lists, such as PYTORCH_CUDA_ALLOC_CONF, "
                              "OMP_PROC_BIND, TZ and HTTPS_PROXY): others can make the stage run code the admin did "
                              "not choose")
        names.append(name)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidSpec(f"{where}.env names {', '.join(twice)} more than once")
    for field_name, prefixes in (("labels", OPERATOR_LABEL_PREFIXES), ("annotations", OPERATOR_ANNOTATION_PREFIXES)):
        what = "label" if field_name == "labels" else "annotation"
        for key, value in (override.get(field_name) or {}).items():
            if len(key) > 317 or not QUALIFIED_NAME.fullmatch(key):
                raise InvalidSpec(f"{where}.{field_name} {key!r} is not {'a' if what == 'label' else 'an'} {what} key "
                                  "([prefix/]name)")
            if key.startswith(prefixes) or field_name == "labels" and key in OPERATOR_LABEL_KEYS:
                raise InvalidSpec(f"{where}.{field_name} {key!r} is the operator's own {what}")
            if field_name == "labels" and (not isinstance(value, str) or not LABEL_VALUE.fullmatch(value)):
                raise InvalidSpec(f"{where}.labels.{key} {value!r} is not a label value")
    for ref in override.get("imagePullSecrets") or []:
        name = ref.get("name", "") if isinstance(ref, dict) else ""
        if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
            raise InvalidSpec(f"{where}.imagePullSecrets {name!r} is not a Secret name (a DNS subdomain)")
    runtime_class = override.get("runtimeClassName")
    if runtime_class is not None and (len(runtime_class) > 253 or not DNS_SUBDOMAIN.fullmatch(runtime_class)):
        raise InvalidSpec(f"{where}.runtimeClassName {runtime_class!r} is not a RuntimeClass name (a DNS subdomain)")
    gpu = override.get("gpuResourceName")
    if gpu is not None and stage != "train":
        raise InvalidSpec(f"{where}.gpuResourceName: only train's pods get GPUs")
    if gpu is not None and (not EXTENDED_RESOURCE.fullmatch(gpu) or len(gpu) > 253
                            or re.match(r"([^/]*\.)?kubernetes\.io/", gpu)):
        raise InvalidSpec(f"{where}.gpuResourceName {gpu!r} is not an extended resource name (a vendor's "
                          "domain/name, such as nvidia.com/gpu, nvidia.com/mig-1g.10gb or amd.com/gpu)")


def validate_trackers(training: dict) -> None:
    """spec.training.reportTo and the settings of the trackers it names (the CRD's rules, again)."""
    report_to = training.get("reportTo") or []
    unknown = sorted(set(report_to) - set(TRACKERS))
    if unknown or len(report_to) != len(set(report_to)):
        raise InvalidSpec(f"spec.training.reportTo {report_to!r} must list each of {', '.join(TRACKERS)} at most once")
    for tracker in ("wandb", "mlflow"):
        if tracker in report_to and not training.get(tracker):
            raise InvalidSpec(f"spec.training.reportTo lists {tracker}: set spec.training.{tracker}")
    wandb, mlflow = training.get("wandb") or {}, training.get("mlflow") or {}
    checks = (("wandb.project", wandb.get("project"), TRACKER_NAME), ("wandb.entity", wandb.get("entity"), TRACKER_NAME),
              ("wandb.host", wandb.get("host"), WANDB_HOST), ("mlflow.trackingUri", mlflow.get("trackingUri"), MLFLOW_URI))
    for where, value, pattern in checks:
        if value is not None and (not isinstance(value, str) or len(value) > 2048 or not pattern.fullmatch(value)):
            raise InvalidSpec(f"spec.training.{where} {value!r} is not valid")
    if "mlflow" in report_to and "trackingUri" not in mlflow:
        raise InvalidSpec("spec.training.mlflow.trackingUri must be set: the MLflow tracking server's http(s) URL")
    if "wandb" in report_to and "apiKeySecretRef" not in wandb:
        raise InvalidSpec("spec.training.wandb.apiKeySecretRef must be set: the Secret key holding the W&B API key")


BOT_IDENTITY, OPERATOR_IDENTITY = "bot", "operator"


def s3_identity(bot: dict, settings: Settings) -> str | None:
    """Whose credentials sign the operator's own S3 requests for a bot (progress reads, deletion): the bot's
    Secret; the operator's identity only for buckets the admin listed, never for a bucket a tenant merely
    names; otherwise none, and the operator does not touch the bot's S3."""
    s3 = bot["spec"]["output"]["s3"]
    if s3.get("credentialsSecretRef"):
        return BOT_IDENTITY
    return OPERATOR_IDENTITY if s3["bucket"] in settings.s3_operator_buckets else None


# What a model is made of, and where its artifacts live: an edit to any of these starts a new run. An edit of
# where the model is published (output.hub) re-runs publish alone, on the same run (`stages.REGISTRY`'s
# `reruns_on`). The rest of the spec is run control (suspend, backoffLimit, activeDeadlineSeconds,
# ttlSecondsAfterFinished, deletionPolicy, resources, podOverrides): it applies to the run's next Jobs and
# spends no GPU time again. podOverrides' image and GPU kind too: like the chart's trainer image, the code and the
# hardware a model is trained with are not part of what it is made of (a rerun annotation trains again).
RUN_DEFINING = ("handles", "source", "data", "model", "training", "output.s3")


def rerun_requested(bot: dict) -> str:
    return (bot["metadata"].get("annotations") or {}).get(RERUN_ANNOTATION, "")


def spec_digest(bot: dict) -> str:
    """What the model is made of: a digest of the run-defining fields as written."""
    defining = {path: spec_field(bot["spec"], path) for path in RUN_DEFINING}
    return digest({path: value for path, value in defining.items() if value is not None})[:16]


def run_id_for(bot: dict, tick: str = "") -> str:
    """The current run: stable across operator restarts and run-control edits, new when what the model is made
    of changes, a new rerun annotation asks for one, or a schedule's `tick` (its time) starts one.

    The recorded run stands while the rerun annotation is the one it answers and either the generation is the
    one observed (so a CRD upgrade that adds defaulted fields does not retrain every bot) or the run-defining
    fields are as it recorded them (`status.specDigest`); otherwise the run is named by a digest of them, the
    annotation and the tick.
    """
    status, rerun, defining = bot.get("status") or {}, rerun_requested(bot), spec_digest(bot)
    unchanged = status.get("observedGeneration") == bot["metadata"].get("generation") or status.get("specDigest") == defining
    if not tick and status.get("runId") and unchanged and (status.get("rerun") or "") == rerun:
        return status["runId"]
    answers = {key: value for key, value in (("rerun", rerun), ("scheduleTime", tick)) if value}
    return digest(bot["metadata"]["uid"], defining, answers)[:6]


def spec_field(spec: dict, path: str):
    """A field of the spec as written, by dotted path; None if absent."""
    for key in path.split("."):
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec


def digest(*parts) -> str:
    """A stable hex digest of JSON values."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def s3_layout(bot: dict, run_id: str) -> S3Layout:
    s3 = with_defaults(bot)["output"]["s3"]
    return S3Layout(
        bucket=s3["bucket"],
        prefix=s3["prefix"],
        namespace=bot["metadata"]["namespace"],
        bot=bot["metadata"]["name"],
        run_id=run_id,
        endpoint=s3.get("endpoint", ""),
        region=s3["region"],
    )


@dataclass(frozen=True)
class SecretView:
    """What the operator may know of a Secret: its keys and whether it opted in, never its values."""

    keys: frozenset[str]
    opted_in: bool


def secret_view(secret: dict) -> SecretView:
    return SecretView(frozenset(secret.get("data") or {}),
                      (secret["metadata"].get("labels") or {}).get(SECRET_OPT_IN_LABEL) == "true")
