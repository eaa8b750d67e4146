"""The stages of a run, one registry entry each, and the Job that runs a stage (spec -> Jobs).

A stage is its phase, its condition, the Secrets it reads and its pod's own part (resources, command,
scheduling); everything else about its Job is common. Adding a stage is an entry here and its name in the
contract's `STAGES` (the order runs follow); `tests/test_reconcile.py` holds the two equal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tweetbot_trainer.contract import (
    BOT_LABEL,
    DEEPSPEED_CONFIG_PATH,
    HUB_PUSH_TOKEN_ENV,
    HUB_TOKEN_ENV,
    MLFLOW_TOKEN_ENV,
    MODEL_CACHE_PATH,
    REQUEST_ENV,
    RUN_LABEL,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SOURCES,
    STAGE_LABEL,
    TERMINATION_MESSAGE_PATH,
    WANDB_API_KEY_ENV,
    StageRequest,
)
from tweetbot_trainer.errors import permanent_exit_codes

from .jobs import COMPLETION_INDEX_ANNOTATION, gang_subdomain
from .names import Phase
from .settings import Settings, StageResources
from .spec import digest, normalize_handles, s3_layout, spec_field, with_defaults

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass
# Where torch.distributed.run's c10d rendezvous listens on a gang's first pod.
RENDEZVOUS_PORT = 29400
COMPLETION_INDEX = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"


@dataclass(frozen=True)
class SecretNeed:
    env: str
    name: str
    key: str
    field: str  # where the spec names it, for error messages


@dataclass
class PodParts:
    """What is a stage's own in its pod."""

    command: list[str]
    resources: dict
    env: list[dict] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    scheduling: dict = field(default_factory=dict)  # tolerations, nodeSelector


@dataclass(frozen=True)
class Lineage:
    """A scheduled run's earlier runs of the same spec: the one whose posts its scrape extends, and the one
    whose model its training starts from (spec.schedule.resumeFrom: previous)."""

    extends_run: str = ""
    starts_from_run: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    phase: Phase  # the bot's phase while this stage runs
    condition: str  # the status condition that turns True when it succeeded
    secrets: Callable[[dict], list[SecretNeed]]  # defaulted spec -> the Secret keys only this stage reads
    pod: Callable[[dict, Settings, Lineage], PodParts]  # defaulted spec, settings, lineage -> its pod's own part
    gpus: Callable[[dict], int] = lambda spec: 0
    pods: Callable[[dict], int] = lambda spec: 1  # more than one: a gang, an Indexed Job with a headless Service
    # A spec field (dotted path) whose edit re-runs this stage alone, on the same run: its Job's name carries a
    # digest of the field as written, so a new value names a new Job.
    reruns_on: str | None = None
    # defaulted spec, status -> why the run ends before this stage with the model as it is ("": it runs)
    up_to_date: Callable[[dict, dict], str] = lambda spec, status: ""


def _ref_need(env: str, ref: dict, where: str) -> SecretNeed:
    return SecretNeed(env, ref["name"], ref["key"], where)


def _source_secrets(spec: dict) -> list[SecretNeed]:
    needs = []
    for key, use in SOURCES.items():
        ref = (spec["source"].get(key) or {}).get(use.field) if use else None
        if ref:
            needs.append(_ref_need(use.env, ref, f"spec.source.{key}.{use.field}"))
    return needs


def _hub_secrets(spec: dict) -> list[SecretNeed]:
    hub = spec["output"].get("hub")
    return [_ref_need(HUB_TOKEN_ENV, hub["tokenSecretRef"], "spec.output.hub.tokenSecretRef")] if hub else []


def _train_secrets(spec: dict) -> list[SecretNeed]:
    """A gated base model's read token: huggingface_hub and transformers take it from HF_TOKEN. With checkpoints
    on the Hub, the output repository's token too, under its own name: the trainer hands it to the pushes alone.
    And the key of each tracker spec.training.reportTo names (only those)."""
    needs = []
    ref = spec["model"].get("tokenSecretRef")
    if ref:
        needs.append(_ref_need(HUB_TOKEN_ENV, ref, "spec.model.tokenSecretRef"))
    hub = spec["output"].get("hub")
    if hub and hub["checkpoints"]:
        needs.append(_ref_need(HUB_PUSH_TOKEN_ENV, hub["tokenSecretRef"], "spec.output.hub.tokenSecretRef"))
    training = spec["training"]
    report_to = training.get("reportTo") or []
    for tracker, field_name, env in (("wandb", "apiKeySecretRef", WANDB_API_KEY_ENV), ("mlflow", "tokenSecretRef", MLFLOW_TOKEN_ENV)):
        ref = (training.get(tracker) or {}).get(field_name)
        if tracker in report_to and ref:
            needs.append(_ref_need(env, ref, f"spec.training.{tracker}.{field_name}"))
    return needs


def _cpu_stage(resources: Callable[[Settings], StageResources], stage: str) -> Callable[[dict, Settings, Lineage], PodParts]:
    def pod(spec: dict, settings: Settings, lineage: Lineage) -> PodParts:
        chosen = resources(settings)
        return PodParts(command=["tweetbot-trainer", stage], resources={
            "requests": {"cpu": chosen.cpu, "memory": chosen.memory}, "limits": {"memory": chosen.memory}})
    return pod


# The Hub ids huggingface_hub downloads ("gpt2", "org/model"); anything else is an s3:// prefix or a local path.
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def why_no_model_cache(spec: dict, settings: Settings, lineage: Lineage) -> str:
    """Why the train pod does not mount the chart's base-model cache ("": it does). Every pod that mounts it can
    write what later pods load under a model's name, and read what earlier ones wrote: so only pods that run the
    admin's code as the operator configured it, downloading public models."""
    model = spec["model"]
    if settings.model_cache_volume is None:
        return "the chart configures no trainer.modelCache"
    if lineage.starts_from_run:
        return f"the training starts from the model of the run {lineage.starts_from_run} in S3, not from the Hub"
    if model["name"].startswith("s3://"):
        return "spec.model.name is an s3:// prefix: the base model comes from S3, not from the Hub"
    if not HUB_MODEL_ID.fullmatch(model["name"]):
        return "spec.model.name is not a Hub model id"
    if model.get("tokenSecretRef"):
        return ("spec.model.tokenSecretRef: a gated or private model in a shared cache would be readable by pods that "
                "never had the token")
    if pod_image(spec, "train", settings) != settings.trainer_image:
        return "spec.podOverrides.train.image: code the admin did not choose could write anything under a model's name"
    # podOverrides.train.env keeps no pod out: validate_spec takes only names contract.env_allowed allows, none of
    # which runs code of the bot author's choosing, moves huggingface_hub's cache or proxies plain-http downloads.
    return ""


def _train_pod(spec: dict, settings: Settings, lineage: Lineage) -> PodParts:
    wanted = spec["resources"]
    gpus, cpu, memory = wanted["gpus"], wanted["cpu"], wanted["memory"]
    # One process per GPU; torch's default of one thread per core per process oversubscribes the CPUs.
    threads = max(1, int(float(cpu.rstrip("m")) / (1000 if cpu.endswith("m") else 1)) // max(gpus, 1))
    parts = PodParts(command=["tweetbot-trainer", "train"],
                     resources={"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
                     env=[{"name": "OMP_NUM_THREADS", "value": str(threads)}])
    if gpus > 1:
        # The stage starts its ranks itself (torch.distributed.run, as `torchrun --standalone`): torchrun would
        # turn every typed exit code into 1.
        parts.command = ["tweetbot-trainer", "train", f"--nproc-per-node={gpus}"]
    if gpus == 0:
        parts.env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    config_map = spec["training"]["deepspeed"].get("configMapRef")
    if config_map:
        parts.volumes.append({"name": "deepspeed-config", "configMap": {
            "name": config_map["name"], "items": [{"key": config_map["key"], "path": "ds_config.json"}]}})
        parts.mounts.append({"name": "deepspeed-config", "mountPath": DEEPSPEED_CONFIG_PATH.rsplit("/", 1)[0],
                             "readOnly": True})
    tolerations = list(wanted.get("tolerations", []))
    if gpus:
        gpu = spec["podOverrides"]["train"]["gpuResourceName"]
        for limits in (parts.resources["requests"], parts.resources["limits"]):
            limits[gpu] = str(gpus)
        # GPU nodes carry a taint of the resource's name; tolerating it is what lets the pod land there (the
        # toleration Kubernetes' ExtendedResourceToleration admission plugin adds where it is on).
        tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        parts.scheduling["tolerations"] = tolerations
    if wanted.get("nodeSelector"):
        parts.scheduling["nodeSelector"] = dict(wanted["nodeSelector"])
    # NCCL and DataLoader workers use shared memory; the container default of 64 MiB is too small.
    parts.volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    parts.mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if not why_no_model_cache(spec, settings, lineage):
        parts.volumes.append({"name": "model-cache", **settings.model_cache_volume})
        parts.mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_PATH})
    return parts


def _no_new_posts(spec: dict, status: dict) -> str:
    """A scheduled run trains only on enough new posts (spec.schedule.minNewPosts)."""
    schedule, new = spec.get("schedule"), (status.get("metrics") or {}).get("newPosts")
    if not status.get("scheduleTime") or not schedule or new is None or new >= schedule["minNewPosts"]:
        return ""
    return (f"{new} new post(s) since the model's run, fewer than spec.schedule.minNewPosts "
            f"({schedule['minNewPosts']}): the model stays as it is")


REGISTRY: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("scrape", Phase.SCRAPING, "DataReady", _source_secrets,
          _cpu_stage(lambda settings: settings.scrape_resources, "scrape")),
    Stage("train", Phase.TRAINING, "Trained", _train_secrets, _train_pod, gpus=lambda spec: spec["resources"]["gpus"],
          up_to_date=_no_new_posts, pods=lambda spec: spec["resources"]["nodes"]),
    Stage("publish", Phase.PUBLISHING, "Published", _hub_secrets,
          _cpu_stage(lambda settings: settings.publish_resources, "publish"), reruns_on="output.hub"),
)}


def job_name(bot: dict, run_id: str, stage: str, rerun_digest: bool = True) -> str:
    """<bot>-<run>-<stage>[-<digest of the field it re-runs on>]: at most 40 + 18 characters, within the
    63 of a label value (the pods' job-name label). `rerun_digest=False`: the name an earlier operator gave."""
    name = f"{bot['metadata']['name']}-{run_id[:5]}-{stage}"
    field_path = REGISTRY[stage].reruns_on
    return f"{name}-{digest(spec_field(bot['spec'], field_path))[:4]}" if field_path and rerun_digest else name


def secret_needs(bot: dict, stage: str) -> list[SecretNeed]:
    """The Secret keys a stage needs, each only in the stage that uses it (S3's in every stage)."""
    spec = with_defaults(bot)
    needs = REGISTRY[stage].secrets(spec)
    credentials = spec["output"]["s3"].get("credentialsSecretRef")
    if credentials:
        needs += [SecretNeed(env, credentials["name"], env, "spec.output.s3.credentialsSecretRef")
                  for env in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)]
    return needs


def stage_request(bot: dict, run_id: str, stage: str, lineage: Lineage = Lineage()) -> StageRequest:
    spec = with_defaults(bot)
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
        data=spec["data"],
        model=_without_secret_refs(spec["model"]),
        training=_without_secret_refs(spec["training"]),
        hub=None if hub is None else _without_secret_refs(hub),
        gpus=REGISTRY[stage].gpus(spec),
        extends_run=lineage.extends_run if stage == "scrape" else "",
        starts_from_run=lineage.starts_from_run if stage == "train" else "",
    )


def _without_secret_refs(value):
    if isinstance(value, dict):
        return {key: _without_secret_refs(item) for key, item in value.items() if not key.endswith("SecretRef")}
    return value


def pod_failure_policy(stage: str, pods: int = 1) -> dict:
    """A pod evicted, preempted or drained away (DisruptionTarget) is retried without counting against backoffLimit;
    an exit code of an error no retry can mend fails the Job at once, and so does any failure of a gang's pod (the
    operator starts the whole gang again: `plan`). The rules are tried in order."""
    rules = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": stage, "operator": "In", "values": permanent_exit_codes()}},
    ]
    if pods > 1:
        rules.append({"action": "FailJob", "onExitCodes": {"containerName": stage, "operator": "NotIn", "values": [0]}})
    return {"rules": rules}


def _gang(job_spec: dict, pod_spec: dict, name: str, run_id: str, pods: int) -> None:
    """`pods` pods started together: an Indexed Job, pod i named <job>-i in the DNS of the headless Service
    <job> (`headless_service`). Each pod's torch.distributed.run finds the others through a c10d rendezvous on
    pod 0, reading the PET_ variables Kubeflow Trainer gives its pods. Every rank resumes from the newest
    checkpoint all pods completed in S3."""
    job_spec.update(completionMode="Indexed", completions=pods, parallelism=pods)
    pod_spec["subdomain"] = name
    first = f"{name}-0.{name}"
    pod_spec["containers"][0]["env"] += [
        {"name": "PET_NNODES", "value": str(pods)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": first},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": f"{first}:{RENDEZVOUS_PORT}"},
        {"name": "PET_RDZV_ID", "value": run_id},
    ]


def headless_service(job: dict) -> dict | None:
    """The Service whose DNS names a gang's pods (<job>-<index>.<job>), or None for a Job of one pod. Owned by
    the Job (the caller adds the reference): it goes with it."""
    subdomain = gang_subdomain(job)
    if not subdomain:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": subdomain, "namespace": job["metadata"]["namespace"], "labels": dict(job["metadata"]["labels"])},
        # Not-ready addresses too: the rendezvous runs before any readiness could be told.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"batch.kubernetes.io/job-name": job["metadata"]["name"]},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}]},
    }


def kueue_labels(bot: dict) -> dict[str, str]:
    """The Kueue labels of a bot's Jobs: the bot's own queue-name and priority-class labels, spec.resources.queueName
    winning over the first."""
    own = bot["metadata"].get("labels") or {}
    labels = {key: own[key] for key in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL) if own.get(key)}
    queue = with_defaults(bot)["resources"].get("queueName")
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    return labels


def pod_image(spec: dict, stage: str, settings: Settings) -> str:
    """A bot's own image only where the chart allows it (`validate_spec` refuses it otherwise)."""
    override = spec["podOverrides"].get(stage) or {}
    return override["image"] if settings.allow_bot_images and override.get("image") else settings.trainer_image


def literal_env(item: dict) -> dict:
    """A podOverrides variable that reaches the container as written. The kubelet expands $(NAME) in a value from
    the variables before it, the Secrets' among them, so `$(X_BEARER_TOKEN)` in a proxy URL or a W&B tag would
    carry a token its author may not read to a host of theirs; `$$` is Kubernetes' escape for `$`."""
    return {**item, "value": item["value"].replace("$", "$$")} if "value" in item else item


def desired_job(bot: dict, run_id: str, stage: str, settings: Settings, named: str | None = None,
                lineage: Lineage = Lineage()) -> dict:
    """The Job manifest of one stage of one run (the caller adds the owner reference), named
    `job_name`'s way unless `named` says otherwise."""
    spec = with_defaults(bot)
    name, job = bot["metadata"]["name"], named or job_name(bot, run_id, stage)
    wanted = spec["resources"]
    labels = {
        "app.kubernetes.io/name": "tweetbot",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/managed-by": "tweetbot-operator",
        BOT_LABEL: name,
        RUN_LABEL: run_id,
        STAGE_LABEL: stage,
    }
    labels.update(kueue_labels(bot))
    parts = REGISTRY[stage].pod(spec, settings, lineage)
    override = spec["podOverrides"].get(stage) or {}
    env = [{"name": REQUEST_ENV, "value": stage_request(bot, run_id, stage, lineage).to_json()}]
    env += [{"name": need.env, "valueFrom": {"secretKeyRef": {"name": need.name, "key": need.key}}}
            for need in secret_needs(bot, stage)]
    pod_spec: dict = {"restartPolicy": "Never", "automountServiceAccountToken": False, **parts.scheduling,
                      **{key: override[key] for key in ("affinity", "imagePullSecrets", "runtimeClassName") if key in override}}
    if wanted.get("priorityClassName"):
        pod_spec["priorityClassName"] = wanted["priorityClassName"]
    if settings.trainer_service_account:
        pod_spec["serviceAccountName"] = settings.trainer_service_account
    pod_spec.update(
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        volumes=[{"name": "tmp", "emptyDir": {}}, *parts.volumes],
        containers=[{
            "name": stage,
            "image": pod_image(spec, stage, settings),
            "imagePullPolicy": settings.image_pull_policy,
            "command": parts.command,
            "env": env + parts.env + [literal_env(item) for item in override.get("env") or []],
            "resources": parts.resources,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *parts.mounts],
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }],
    )
    pods = REGISTRY[stage].pods(spec)
    # The bot's pod labels under the operator's (`validate_spec` refuses any of the operator's own keys).
    pod_metadata: dict = {"labels": {**(override.get("labels") or {}), **labels}}
    if override.get("annotations"):
        pod_metadata["annotations"] = dict(override["annotations"])
    job_spec: dict = {"backoffLimit": spec["backoffLimit"], "podFailurePolicy": pod_failure_policy(stage, pods),
                      "template": {"metadata": pod_metadata, "spec": pod_spec}}
    if KUEUE_QUEUE_LABEL in labels:
        job_spec["suspend"] = True  # Kueue admits it by unsuspending, as its webhook would have done
    # ttlSecondsAfterFinished is applied by the operator (`plan`), only once a Job's result is in the status:
    # the Job controller would delete it on time whether or not its result had been read.
    if spec.get("activeDeadlineSeconds") is not None:
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    if pods > 1:
        _gang(job_spec, pod_spec, job, run_id, pods)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job, "namespace": bot["metadata"]["namespace"], "labels": labels},
        "spec": job_spec,
    }
