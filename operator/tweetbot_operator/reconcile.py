"""The operator's pure core: a TweetBot and what exists for it -> the Jobs to create or delete and its status.

Nothing here talks to Kubernetes; `handlers.py` gathers an `Observed`, calls `plan`, and applies the `Plan`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from tweetbot_trainer.contract import (
    BOT_LABEL,
    DEEPSPEED_CONFIG_PATH,
    GROUP,
    HUB_TOKEN_ENV,
    MASTODON_TOKEN_ENV,
    MAX_HANDLES,
    REQUEST_ENV,
    RUN_LABEL,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    STAGE_LABEL,
    STAGES,
    TERMINATION_MESSAGE_PATH,
    X_BEARER_TOKEN_ENV,
    ContractError,
    S3Layout,
    Progress,
    StageRequest,
    StageResult,
)

from .settings import Settings

GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
STAGE_PHASES = {"scrape": "Scraping", "train": "Training", "publish": "Publishing"}
STAGE_CONDITIONS = {"scrape": "DataReady", "train": "Trained", "publish": "Published"}
# A Secret a TweetBot may name carries this label: without the opt-in, anyone allowed to create TweetBots
# could send any Secret of the namespace to a host of their choosing.
SECRET_OPT_IN_LABEL = f"{GROUP}/usable-by-tweetbots"
MAX_RECORDED_RUNS = 500  # status.runs: what deletionPolicy Delete deletes

# What the API server accepts, checked again here because the CRD in the cluster may be older than the operator.
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9!_.*'()-]{0,127}")  # one key segment: the layout stays injective
REGION = re.compile(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?")


class InvalidSpec(ValueError):
    """Input the schema cannot catch; the message says what to fix."""


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
    spec = bot["spec"]
    normalize_handles(spec["handles"])
    for where, ref in _object_refs(spec, "spec"):
        name, key = ref.get("name", ""), ref.get("key", "token")
        if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
            raise InvalidSpec(f"{where}.name {name!r} is not a Kubernetes object name (a DNS subdomain)")
        if len(key) > 253 or not CONFIG_KEY.fullmatch(key):
            raise InvalidSpec(f"{where}.key {key!r} is not a Secret or ConfigMap key")
    s3 = spec["output"]["s3"]
    checks = (("bucket", s3["bucket"], BUCKET, "an S3 bucket name"),
              ("prefix", s3.get("prefix", "tweetbot"), PREFIX, "one key segment (letters, digits, !_.*'()-; no '/')"),
              ("region", s3.get("region", "us-east-1"), REGION, "a region name (lower-case letters, digits, '-')"))
    for field_name, value, pattern, what in checks:
        if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
            raise InvalidSpec(f"spec.output.s3.{field_name} {value!r} must be {what}")
    endpoint = s3.get("endpoint", "")
    if endpoint and endpoint.rstrip("/") not in settings.s3_endpoints:
        allowed = ", ".join(settings.s3_endpoints) or "none: only AWS S3"
        raise InvalidSpec(f"spec.output.s3.endpoint {endpoint!r} is not an S3 endpoint this operator may use "
                          f"(allowed: {allowed}; the chart's s3.endpoints)")
    if spec.get("deletionPolicy") == "Delete" and s3_identity(bot, settings) is None:
        raise InvalidSpec("deletionPolicy Delete needs spec.output.s3.credentialsSecretRef: the operator deletes "
                          "with the bot's own credentials, and with its own identity only in the chart's "
                          "s3.operatorBuckets")
    priority_class = spec.get("resources", {}).get("priorityClassName")
    if priority_class is not None and not DNS_SUBDOMAIN.fullmatch(priority_class):
        raise InvalidSpec(f"spec.resources.priorityClassName {priority_class!r} is not a DNS subdomain")


BOT_IDENTITY, OPERATOR_IDENTITY = "bot", "operator"


def s3_identity(bot: dict, settings: Settings) -> str | None:
    """Whose credentials sign the operator's own S3 requests for a bot (progress reads, deletion): the bot's
    Secret; the operator's identity only for buckets the admin listed, never for a bucket a tenant merely
    names; otherwise none, and the operator does not touch the bot's S3."""
    s3 = bot["spec"]["output"]["s3"]
    if s3.get("credentialsSecretRef"):
        return BOT_IDENTITY
    return OPERATOR_IDENTITY if s3["bucket"] in settings.s3_operator_buckets else None


def run_id_for(bot: dict) -> str:
    """The current run: stable across operator restarts and suspend/resume, new on any other spec edit.

    While the generation is the one already observed, the recorded run stands (so a CRD upgrade that adds
    defaulted fields does not retrain every bot); after an edit, the run is named by a digest of the spec
    without `suspend`.
    """
    status = bot.get("status") or {}
    if status.get("runId") and status.get("observedGeneration") == bot["metadata"].get("generation"):
        return status["runId"]
    spec = {key: value for key, value in bot["spec"].items() if key != "suspend"}
    digest = hashlib.sha256((bot["metadata"]["uid"] + json.dumps(spec, sort_keys=True)).encode())
    return digest.hexdigest()[:6]


def job_name(bot_name: str, run_id: str, stage: str) -> str:
    return f"{bot_name}-{run_id[:5]}-{stage}"


def s3_layout(bot: dict, run_id: str) -> S3Layout:
    s3 = bot["spec"]["output"]["s3"]
    return S3Layout(
        bucket=s3["bucket"],
        prefix=s3.get("prefix", "tweetbot"),
        namespace=bot["metadata"]["namespace"],
        bot=bot["metadata"]["name"],
        run_id=run_id,
        endpoint=s3.get("endpoint", ""),
        region=s3.get("region", "us-east-1"),
    )


def stage_request(bot: dict, run_id: str, stage: str) -> StageRequest:
    spec = bot["spec"]
    hub = spec["output"].get("hub")
    return StageRequest(
        stage=stage,
        run_id=run_id,
        namespace=bot["metadata"]["namespace"],
        bot=bot["metadata"]["name"],
        handles=normalize_handles(spec["handles"]),
        s3=s3_layout(bot, run_id),
        # Secret references stay out of the request: the values arrive as environment variables.
        source={key: _without_secret_refs(value) for key, value in spec["source"].items()},
        data=spec.get("data", {}),
        model=spec.get("model", {}),
        training=spec.get("training", {}),
        hub=None if hub is None else _without_secret_refs(hub),
        gpus=spec.get("resources", {}).get("gpus", 1) if stage == "train" else 0,
    )


def _without_secret_refs(value):
    if isinstance(value, dict):
        return {key: _without_secret_refs(item) for key, item in value.items() if not key.endswith("SecretRef")}
    return value


@dataclass(frozen=True)
class SecretNeed:
    env: str
    name: str
    key: str
    field: str  # where the spec names it, for error messages


def secret_needs(bot: dict, stage: str) -> list[SecretNeed]:
    """The Secret keys a stage needs, each only in the stage that uses it."""
    spec = bot["spec"]
    needs = []
    if stage == "scrape":
        for source, field_name, env in (
            ("x", "bearerTokenSecretRef", X_BEARER_TOKEN_ENV),
            ("mastodon", "accessTokenSecretRef", MASTODON_TOKEN_ENV),
        ):
            ref = spec["source"].get(source, {}).get(field_name)
            if ref:
                needs.append(SecretNeed(env, ref["name"], ref.get("key", "token"), f"spec.source.{source}.{field_name}"))
    if stage == "publish" and spec["output"].get("hub"):
        ref = spec["output"]["hub"]["tokenSecretRef"]
        needs.append(SecretNeed(HUB_TOKEN_ENV, ref["name"], ref.get("key", "token"), "spec.output.hub.tokenSecretRef"))
    credentials = spec["output"]["s3"].get("credentialsSecretRef")
    if credentials:
        for env in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV):
            needs.append(SecretNeed(env, credentials["name"], env, "spec.output.s3.credentialsSecretRef"))
    return needs


def desired_job(bot: dict, run_id: str, stage: str, settings: Settings) -> dict:
    """The Job manifest of one stage of one run (owner reference added by the caller with kopf.adopt)."""
    spec = bot["spec"]
    name = bot["metadata"]["name"]
    resources_spec = spec.get("resources", {})
    labels = {
        "app.kubernetes.io/name": "tweetbot",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/managed-by": "tweetbot-operator",
        BOT_LABEL: name,
        RUN_LABEL: run_id,
        STAGE_LABEL: stage,
    }
    if resources_spec.get("queueName"):
        labels[KUEUE_QUEUE_LABEL] = resources_spec["queueName"]

    env = [{"name": REQUEST_ENV, "value": stage_request(bot, run_id, stage).to_json()}]
    env += [
        {"name": need.env, "valueFrom": {"secretKeyRef": {"name": need.name, "key": need.key}}}
        for need in secret_needs(bot, stage)
    ]
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    pod_spec: dict = {"restartPolicy": "Never", "automountServiceAccountToken": False}

    command = ["tweetbot-trainer", stage]
    if stage == "train":
        gpus = resources_spec.get("gpus", 1)
        memory = resources_spec.get("memory", "16Gi")
        cpu = resources_spec.get("cpu", "4")
        # One process per GPU; torch's default of one thread per core per process oversubscribes the CPUs.
        threads = max(1, int(float(cpu.rstrip("m")) / (1000 if cpu.endswith("m") else 1)) // max(gpus, 1))
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
        if gpus > 1:
            command = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "tweetbot_trainer.cli", "train"]
        if gpus == 0:
            env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
        config_map = spec.get("training", {}).get("deepspeed", {}).get("configMapRef")
        if config_map:
            volumes.append({"name": "deepspeed-config", "configMap": {
                "name": config_map["name"], "items": [{"key": config_map.get("key", "ds_config.json"), "path": "ds_config.json"}]}})
            mounts.append({"name": "deepspeed-config", "mountPath": DEEPSPEED_CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True})
        resources = {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory},
        }
        tolerations = list(resources_spec.get("tolerations", []))
        if gpus:
            resources["requests"][GPU_RESOURCE] = str(gpus)
            resources["limits"][GPU_RESOURCE] = str(gpus)
            # GPU nodes carry this taint; tolerating it is what lets the pod land there.
            tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
        if tolerations:
            pod_spec["tolerations"] = tolerations
        if resources_spec.get("nodeSelector"):
            pod_spec["nodeSelector"] = dict(resources_spec["nodeSelector"])
        # NCCL and DataLoader workers use shared memory; the container default of 64 MiB is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    else:
        stage_resources = settings.scrape_resources if stage == "scrape" else settings.publish_resources
        resources = {
            "requests": {"cpu": stage_resources.cpu, "memory": stage_resources.memory},
            "limits": {"memory": stage_resources.memory},
        }
    if resources_spec.get("priorityClassName"):
        pod_spec["priorityClassName"] = resources_spec["priorityClassName"]
    if settings.trainer_service_account:
        pod_spec["serviceAccountName"] = settings.trainer_service_account

    pod_spec.update(
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        volumes=volumes,
        containers=[
            {
                "name": stage,
                "image": settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": command,
                "env": env,
                "resources": resources,
                "volumeMounts": mounts,
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    )
    job_spec: dict = {
        "backoffLimit": spec.get("backoffLimit", 2),
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if resources_spec.get("queueName"):
        job_spec["suspend"] = True  # Kueue admits it by unsuspending, as its webhook would have done
    # ttlSecondsAfterFinished is applied by the operator (`_expired_jobs`), only once a Job's result is in
    # the status: the Job controller would delete it on time whether or not its result had been read.
    if spec.get("activeDeadlineSeconds") is not None:
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(name, run_id, stage), "namespace": bot["metadata"]["namespace"], "labels": labels},
        "spec": job_spec,
    }


# --- Jobs -> status ------------------------------------------------------------------------------


def job_state(job: dict) -> str:
    status = job.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conditions:
        return "Succeeded"
    if "Failed" in conditions:
        return "Failed"
    if job.get("spec", {}).get("suspend"):
        return "Queued"
    # Started and not finished is running, also between pods (a retry's back-off, a pod counted as done
    # before the Job's condition is set).
    if status.get("active") or status.get("ready") or status.get("startTime"):
        return "Running"
    return "Pending"


def occupies_training_slot(job: dict) -> bool:
    """An admitted, unfinished train Job that a TweetBot controls. A Job that merely carries the label, or
    waits suspended in a Kueue queue, holds none of the operator's training slots."""
    metadata = job["metadata"]
    controlled = any(owner.get("controller") and owner.get("kind") == "TweetBot"
                     and owner.get("apiVersion", "").startswith(f"{GROUP}/")
                     for owner in metadata.get("ownerReferences") or [])
    return (controlled and (metadata.get("labels") or {}).get(STAGE_LABEL) == "train"
            and job_state(job) in ("Pending", "Running"))


def stage_result_from_pod(pod: dict, stage: str) -> StageResult | None:
    """What a finished stage pod reported in its termination message, or why it could not: a container the
    kernel killed for its memory wrote none (the kubelet would put its log's tail there instead)."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated.get("reason") == "OOMKilled":
            limit = "spec.resources.memory" if stage == "train" else f"the chart's trainer.{stage}.memory"
            return StageResult(stage=stage, run_id="", ok=False,
                               error=f"the {stage} container ran out of memory (OOMKilled); raise {limit}")
        if terminated.get("message"):
            try:
                return StageResult.from_termination_message(terminated["message"])
            except ContractError as error:
                return StageResult(stage=stage, run_id="", ok=False, error=str(error))
    return None


def job_fingerprint(job: dict) -> tuple:
    """What of a Job is worth a reconcile: its state, its pods' outcomes and times. Other changes (ready and
    active counts, the Job controller's pod bookkeeping) are left for the next pass to pick up."""
    status = job.get("status") or {}
    return (job_state(job), status.get("succeeded", 0), status.get("failed", 0),
            status.get("startTime"), status.get("completionTime"))


@dataclass(frozen=True)
class SecretView:
    """What the operator may know of a Secret: its keys and whether it opted in, never its values."""

    keys: frozenset[str]
    opted_in: bool


def secret_view(secret: dict) -> SecretView:
    return SecretView(frozenset(secret.get("data") or {}),
                      (secret["metadata"].get("labels") or {}).get(SECRET_OPT_IN_LABEL) == "true")


@dataclass
class Observed:
    """What the shell read from the cluster for one bot."""

    jobs: list[dict] = field(default_factory=list)
    # Stage results read from terminated pods' termination messages, by Job name (only for Jobs that ended).
    results: dict[str, StageResult] = field(default_factory=dict)
    # Each Secret the bot references; None for a Secret that does not exist. Looked up only when a stage's
    # Job is about to be created, so the shell may read Secrets lazily.
    secrets: Mapping[str, SecretView | None] = field(default_factory=dict)
    # Jobs the API server refused to create, with its message (quota, admission, a field it rejects).
    rejected: dict[str, str] = field(default_factory=dict)
    # Train Jobs running for other bots (for the operator's own concurrency limit).
    other_active_trainings: int = 0
    # The running train stage's latest report, if it has written one.
    progress: Progress | None = None


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None  # seconds until a finished Job's ttlSecondsAfterFinished is due


def _timestamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(bot: dict, observed: Observed, settings: Settings, now: datetime) -> Plan:
    """Decide the next step of a bot's run and the status that describes it."""
    metadata, spec = bot["metadata"], bot["spec"]
    old_status = bot.get("status") or {}
    generation = metadata.get("generation")
    result = Plan()

    try:
        validate_spec(bot, settings)
    except InvalidSpec as error:
        return _finish(result, old_status, generation, now, phase="Failed", reason="InvalidSpec",
                       message=str(error), stalled=True)

    run_id = run_id_for(bot)
    same_run = old_status.get("runId") == run_id
    recorded = (old_status.get("stages") or {}) if same_run else {}
    jobs = {job["metadata"]["name"]: job for job in observed.jobs}
    result.delete = sorted(name for name, job in jobs.items() if job["metadata"].get("labels", {}).get(RUN_LABEL) != run_id)

    status: dict = {
        "runId": run_id,
        "startTime": old_status.get("startTime") if same_run and old_status.get("startTime") else _timestamp(now),
        "stages": {},
        "data": old_status.get("data") if same_run else None,
        "metrics": old_status.get("metrics") if same_run else None,
        "artifacts": dict(old_status.get("artifacts") or {}) if same_run else {},
        "attempts": 0,
        # Every run this bot started, so that deleting it deletes exactly its own artifacts.
        "runs": list(dict.fromkeys([*(old_status.get("runs") or []), run_id]))[-MAX_RECORDED_RUNS:],
    }

    phase, reason, message, stalled = "Pending", "Pending", "", False
    done = 0
    for stage in STAGES:
        name = job_name(metadata["name"], run_id, stage)
        job = jobs.get(name)
        record = recorded.get(stage) or {}
        if record.get("jobName") == name and record.get("state") == "Succeeded":
            status["stages"][stage] = record  # kept even after the Job's TTL removed it
            status["attempts"] += max(0, record.get("attempts", 1) - 1)  # its failed pods before it succeeded
            done += 1
            continue
        if job is None and record.get("jobName") == name and record.get("state") == "Failed":
            status["stages"][stage] = record  # failed, and its Job since removed: stays failed until an edit
            phase, reason, stalled = "Failed", "StageFailed", True
            message = f"stage {stage} failed: {record.get('message', '')}".rstrip(": ")
            break
        if job is None:
            if spec.get("suspend"):
                phase, reason, message = "Suspended", "Suspended", "spec.suspend is true"
                break
            missing = _missing_secrets(bot, stage, observed)
            if missing:
                phase, reason, message, stalled = "Pending", "SecretMissing", missing, True
                break
            if name in observed.rejected:
                phase, reason, stalled = "Pending", "JobRejected", True
                message = f"the API server refused Job {name}: {observed.rejected[name]}"
                break
            if stage == "train" and settings.max_concurrent_trainings and (
                observed.other_active_trainings >= settings.max_concurrent_trainings
            ):
                phase, reason = "Queued", "WaitingForTrainingSlot"
                message = f"all {settings.max_concurrent_trainings} training slots of the operator are in use"
                break
            result.create.append(desired_job(bot, run_id, stage, settings))
            status["stages"][stage] = {"jobName": name, "state": "Pending"}
            phase, reason, message = STAGE_PHASES[stage], "JobCreated", f"created Job {name}"
            break

        state = job_state(job)
        job_status = job.get("status") or {}
        status["attempts"] += job_status.get("failed", 0)
        stage_status = {"jobName": name, "state": "Pending" if state == "Queued" else state,
                        "attempts": job_status.get("failed", 0) + job_status.get("succeeded", 0) + job_status.get("active", 0)}
        for key in ("startTime", "completionTime"):
            if job_status.get(key):
                stage_status[key] = job_status[key]
        status["stages"][stage] = stage_status

        if spec.get("suspend") and state not in ("Succeeded", "Failed"):
            result.delete.append(name)  # resumes from its checkpoint when recreated
            del status["stages"][stage]
            phase, reason, message = "Suspended", "Suspended", "spec.suspend is true; the running stage was stopped"
            break
        if state == "Succeeded":
            stage_result = observed.results.get(name)
            if stage_result is None or not stage_result.ok:
                stage_status["state"] = "Failed"
                phase, reason, stalled = "Failed", "NoStageResult", True
                message = f"stage {stage} (Job {name}) exited successfully but reported no result"
                break
            _apply_result(status, stage, stage_result)
            done += 1
            continue
        if state == "Failed":
            stage_result = observed.results.get(name)
            failure = next((c for c in job_status.get("conditions") or [] if c.get("type") == "Failed"), {})
            detail = (stage_result.error if stage_result is not None and stage_result.error
                      else record.get("message") if record.get("jobName") == name and record.get("message")
                      else failure.get("message", ""))
            stage_status["message"] = detail
            phase, reason, stalled = "Failed", "StageFailed", True
            message = f"stage {stage} failed after {job_status.get('failed', 0)} attempt(s): {detail}".rstrip(": ")
            break
        phase = "Queued" if state == "Queued" else STAGE_PHASES[stage]
        reason = "Queued" if state == "Queued" else f"{stage.capitalize()}{state}"
        message = f"Job {name} is {state.lower()}"
        if stage == "train" and state == "Running" and observed.progress is not None:
            status["progress"] = _live_progress(observed.progress)
        break
    else:
        phase, reason, message = "Succeeded", "Succeeded", "scraped, trained and published"

    status.setdefault("progress", {"summary": f"{done}/{len(STAGES)}"})
    if spec.get("ttlSecondsAfterFinished") is not None:
        expired, result.requeue_after = _expired_jobs(jobs, recorded, status["stages"], spec["ttlSecondsAfterFinished"], now)
        result.delete += expired
    return _finish(result, old_status, generation, now, phase=phase, reason=reason, message=message,
                   stalled=stalled, status=status, done=done)


def _expired_jobs(jobs: dict[str, dict], recorded: dict, stages: dict, ttl: int, now: datetime) -> tuple[list[str], float | None]:
    """Finished Jobs whose result the status held before this pass and whose TTL has run out, and the seconds
    until the next one is due (Jobs this pass records are due no earlier than the next pass)."""
    expired, next_due = [], None
    for stage, record in stages.items():
        job = jobs.get(record.get("jobName"))
        ended = _ended_at(job) if job is not None and record.get("state") in ("Succeeded", "Failed") else None
        if ended is None:
            continue
        due = (ended - now).total_seconds() + ttl
        if due <= 0 and (recorded.get(stage) or {}).get("state") == record["state"]:
            expired.append(record["jobName"])
        else:
            next_due = min(next_due or float("inf"), max(due, 1.0))
    return expired, next_due


def _ended_at(job: dict) -> datetime | None:
    status = job.get("status") or {}
    ended = status.get("completionTime") or next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)
    return datetime.strptime(ended, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) if ended else None


def _missing_secrets(bot: dict, stage: str, observed: Observed) -> str:
    problems = []
    for need in secret_needs(bot, stage):
        secret = observed.secrets.get(need.name)
        if secret is None:
            problems.append(f"Secret {need.name!r} (named by {need.field}) does not exist")
        elif not secret.opted_in:
            problems.append(f"Secret {need.name!r} (named by {need.field}) is not labelled "
                            f"{SECRET_OPT_IN_LABEL}=true; label it to let TweetBots use it")
        elif need.key not in secret.keys:
            problems.append(f"Secret {need.name!r} (named by {need.field}) has no key {need.key!r}")
    return "; ".join(dict.fromkeys(problems))


def _live_progress(progress: Progress) -> dict:
    live = {"step": progress.step, "totalSteps": progress.total_steps,
            "summary": f"train {progress.percent}% ({progress.step}/{progress.total_steps} steps)"}
    for key, value in (("loss", progress.loss), ("tokensPerSecond", progress.tokens_per_second),
                       ("etaSeconds", progress.eta_seconds)):
        if value is not None:
            live[key] = value
    return live


def _apply_result(status: dict, stage: str, stage_result: StageResult) -> None:
    if stage_result.data:
        status["data"] = [
            {key: value for key, value in vars(stats).items() if value != ""} for stats in stage_result.data
        ]
    if stage_result.metrics:
        status["metrics"] = dict(stage_result.metrics)
    status["artifacts"].update(stage_result.artifacts)


def _condition(old: list[dict], type_: str, true: bool, reason: str, message: str, generation, now: datetime) -> dict:
    value = "True" if true else "False"
    previous = next((c for c in old if c.get("type") == type_), None)
    changed_at = previous["lastTransitionTime"] if previous and previous.get("status") == value else _timestamp(now)
    return {"type": type_, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": changed_at, "observedGeneration": generation}


def _finish(result: Plan, old_status: dict, generation, now: datetime, *, phase: str, reason: str, message: str,
            stalled: bool, status: dict | None = None, done: int = 0) -> Plan:
    status = dict(status or {})
    status.setdefault("runs", old_status.get("runs") or [])  # kept through an invalid spec: deletion needs it
    old_conditions = old_status.get("conditions") or []
    terminal = phase in ("Succeeded", "Failed")
    conditions = [
        _condition(old_conditions, "Ready", phase == "Succeeded", reason, message, generation, now),
        _condition(old_conditions, "Reconciling", not terminal and phase != "Suspended" and not stalled,
                   reason, message, generation, now),
        _condition(old_conditions, "Stalled", stalled, reason if stalled else "NotStalled",
                   message if stalled else "", generation, now),
    ]
    for index, stage in enumerate(STAGES):
        finished = index < done
        conditions.append(_condition(old_conditions, STAGE_CONDITIONS[stage], finished,
                                     "StageSucceeded" if finished else "StageNotFinished", "", generation, now))
    status.update(phase=phase, observedGeneration=generation, conditions=conditions,
                  lastError=message if phase == "Failed" or stalled else None)
    if terminal:
        status["completionTime"] = old_status.get("completionTime") if old_status.get("phase") == phase else _timestamp(now)
    else:
        status["completionTime"] = None
    if old_status.get("phase") != phase:
        event_type = "Warning" if phase == "Failed" or stalled else "Normal"
        result.events.append((event_type, reason, f"{phase}: {message}" if message else phase))
    elif stalled and old_status.get("lastError") != message:
        result.events.append(("Warning", reason, message))
    result.status = status
    return result


def status_patch(old: dict, new: dict) -> dict:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: nested objects are merged, so every
    field `new` drops must be named with null."""
    patch = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            nested = status_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif old.get(key) != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
