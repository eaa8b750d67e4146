"""The operator's vocabulary, named once: the bot's phases, its Jobs' states, the reasons on its status and
events, and its condition types. Users and alerts key on these strings; `tests/test_crd.py` holds the CRD's
enums to them."""

from __future__ import annotations

from enum import StrEnum

from tweetbot_trainer.contract import GROUP

VERSION = "v1alpha1"
PLURAL = "tweetbots"
KIND = "TweetBot"
BOTS = f"{GROUP}/{VERSION}"  # the group/version the API paths use
# Only on bots whose deletionPolicy is Delete: released once the bot's artifacts are deleted.
FINALIZER = f"{GROUP}/artifacts"
# A new value starts a new run without an edit of the spec (GitOps: Flux's reconcile.fluxcd.io/requestedAt).
RERUN_ANNOTATION = f"{GROUP}/rerun"


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    SCRAPING = "Scraping"
    TRAINING = "Training"
    PUBLISHING = "Publishing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


FINISHED = (Phase.SUCCEEDED, Phase.FAILED)


class JobState(StrEnum):
    """A stage Job's state as the status shows it (`Queued`: suspended in a Kueue queue, shown as Pending)."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


ENDED = (JobState.SUCCEEDED, JobState.FAILED)


class Condition(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Reason(StrEnum):
    PENDING = "Pending"
    INVALID_SPEC = "InvalidSpec"
    SECRET_MISSING = "SecretMissing"
    JOB_REJECTED = "JobRejected"
    WAITING_FOR_TRAINING_SLOT = "WaitingForTrainingSlot"
    JOB_CREATED = "JobCreated"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    GANG_RESTARTING = "GangRestarting"  # a pod of a multi-node training failed: all its pods start again
    UP_TO_DATE = "UpToDate"  # a scheduled run found too few new posts to train: the model stands
    STAGE_FAILED = "StageFailed"
    NO_STAGE_RESULT = "NoStageResult"
    # The conditions of each stage (DataReady, Trained, Published).
    STAGE_SUCCEEDED = "StageSucceeded"
    STAGE_NOT_FINISHED = "StageNotFinished"
    NOT_STALLED = "NotStalled"
    # Events of a bot's deletion.
    ARTIFACTS_LEFT = "ArtifactsLeft"
    ARTIFACTS_DELETED = "ArtifactsDeleted"


def stage_reason(stage: str, state: JobState) -> str:
    """The reason while a stage's Job is pending or running: ScrapePending, TrainRunning, ..."""
    return f"{stage.capitalize()}{state}"
