"""What a stage Job says: its state, whether it is worth a pass, whether it holds a training slot, and the
result its pod reported."""

from __future__ import annotations

from datetime import datetime

from tweetbot_trainer.contract import GROUP, STAGE_LABEL, ContractError, StageResult

from .names import KIND, JobState


def job_state(job: dict) -> JobState:
    status = job.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conditions:
        return JobState.SUCCEEDED
    if "Failed" in conditions:
        return JobState.FAILED
    if job.get("spec", {}).get("suspend"):
        return JobState.QUEUED
    # Started and not finished is running, also between pods (a retry's back-off, a pod counted as done
    # before the Job's condition is set).
    if status.get("active") or status.get("ready") or status.get("startTime"):
        return JobState.RUNNING
    return JobState.PENDING


def job_fingerprint(job: dict) -> tuple:
    """What of a Job is worth a reconcile: its state, its pods' outcomes and times. Other changes (ready and
    active counts, the Job controller's pod bookkeeping) are left for the next pass to pick up."""
    status = job.get("status") or {}
    return (job_state(job), status.get("succeeded", 0), status.get("failed", 0),
            status.get("startTime"), status.get("completionTime"))


def parse_time(text: str) -> datetime:
    """A time as the API server (and the operator's status) writes it: RFC 3339, "Z" for UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ended_at(job: dict) -> datetime | None:
    status = job.get("status") or {}
    ended = status.get("completionTime") or next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)
    return parse_time(ended) if ended else None


def occupies_training_slot(job: dict) -> bool:
    """An admitted, unfinished train Job that a TweetBot controls. A Job that merely carries the label, or
    waits suspended in a Kueue queue, holds none of the operator's training slots."""
    metadata = job["metadata"]
    controlled = any(owner.get("controller") and owner.get("kind") == KIND
                     and owner.get("apiVersion", "").startswith(f"{GROUP}/")
                     for owner in metadata.get("ownerReferences") or [])
    return (controlled and (metadata.get("labels") or {}).get(STAGE_LABEL) == "train"
            and job_state(job) in (JobState.PENDING, JobState.RUNNING))


# Kueue's label on the Workload it makes for a Job.
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
MAX_ADMISSION_MESSAGE = 512


def admission_message(workloads: list[dict]) -> str | None:
    """Why Kueue has not admitted a queued Job, from its newest Workload: the first of quota reservation and
    admission that is not met, with Kueue's message (bounded: it names every pod set); None if nothing says."""
    if not workloads:
        return None
    newest = max(workloads, key=lambda workload: workload["metadata"].get("creationTimestamp", ""))
    conditions = {c.get("type"): c for c in (newest.get("status") or {}).get("conditions") or []}
    for kind in ("QuotaReserved", "Admitted"):
        condition = conditions.get(kind)
        if condition is not None and condition.get("status") != "True" and condition.get("message"):
            return condition["message"][:MAX_ADMISSION_MESSAGE]
    return None


# The annotation on each pod of an Indexed Job (a gang) that holds its index.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def gang_subdomain(job: dict) -> str | None:
    """The subdomain of a Job whose pods find each other by DNS (several nodes), or None."""
    return ((job.get("spec", {}).get("template") or {}).get("spec") or {}).get("subdomain")


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
